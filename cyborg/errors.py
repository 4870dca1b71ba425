"""Errors shared by every part of cyborg."""


class UserError(Exception):
    """A problem with the user's input (a file, a flag, a model folder).

    The CLI prints its message as one line without a traceback and exits with status 2.
    """
