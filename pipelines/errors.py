"""The one exception type that reaches the user as a one-line message (exit status 2)."""


class UserError(Exception):
    """Bad input the user can fix: printed as one line by run.py, never with a traceback."""
