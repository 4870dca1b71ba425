"""The errors both halves raise: a problem with the user's input, named once.

The CLI prints any `UserError` as one line without a traceback and exits with status 2; the server
maps `ImageTooLarge` to RESOURCE_EXHAUSTED and every other `UserError` to INVALID_ARGUMENT
(`serving.errors.status_of`). Errors that only one half raises live with the code that raises them
(`training.checkpoint.CheckpointError`, `serving.errors.ServingError`, ...).
"""


class UserError(Exception):
    """A problem with the user's input (a file, a flag, a model folder).

    The CLI prints its message as one line without a traceback and exits with status 2.
    """


class ContractError(UserError):
    """A model folder that does not hold a valid model.json or whose files do not match it."""


class ImageError(UserError):
    """An image that cannot be used: empty, corrupt, truncated, too large, too small or animated."""


class ImageTooLarge(ImageError):
    """An image over the byte or pixel limit."""
