"""One exception type for every user-facing problem: the command line prints it on one line, exit 2."""


class CLIVizError(Exception):
    """A problem with the user's input (file, model folder, question, option): never a bug."""


class Interrupted(CLIVizError):
    """Ctrl-C during a command that wrote something: the message says what was kept (exit code 130)."""


class CLIVizIndexError(CLIVizError, IndexError):
    """An index out of range (`TraceSet[i]`): still an `IndexError`, as Python's containers raise, so
    `except IndexError` keeps working; cliviz's one-line message says the valid range."""


class CLIVizWarning(UserWarning):
    """Something the user should know about an accepted input (an image unlike the model's training
    scenes): a `warning: ...` line on the command line, a note in the dashboard, a Python warning in the API."""
