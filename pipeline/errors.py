"""The one exception type the pipeline raises for problems a user can act on."""


class SkyferryError(Exception):
    """A failure with a message fit for an operator; `hint` says what to do about it, and `log` holds the
    tail of the failing tool's own log (CRIU's, runc's) for the migration journal."""

    def __init__(self, message: str, hint: str | None = None, log: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint
        self.log = log
