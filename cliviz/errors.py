"""One exception type for every user-facing problem: the command line prints it on one line, exit 2."""


class CLIVizError(Exception):
    """A problem with the user's input (file, model folder, question, option): never a bug."""


class Interrupted(CLIVizError):
    """Ctrl-C during a command that wrote something: the message says what was kept (exit code 130)."""
