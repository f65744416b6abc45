"""Errors a user sees as one line, naming the file, layer or node at fault."""


class DairError(Exception):
    """A failure with a message fit for the user: printed as one line, no traceback."""


class ModelFormatError(DairError):
    """The model file is malformed, truncated or of an unsupported kind."""

    def __init__(self, path: object, what: str) -> None:
        super().__init__(f"{path}: {what}")
        self.path = path
        self.what = what
