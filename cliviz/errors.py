"""One exception type for every user-facing problem: the command line prints it on one line, exit 2."""


class CLIVizError(Exception):
    """A problem with the user's input (file, model folder, question, option): never a bug."""
