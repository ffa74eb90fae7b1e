class UserError(Exception):
    """An error caused by the user's input; shown as one line, never as a traceback."""


class ModelLoadError(UserError):
    """A model path or file that cannot be loaded."""
