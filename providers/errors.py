"""The one exception type providers raise for problems a user can act on."""


class ProviderError(Exception):
    """A failure with a message fit for an operator; `hint` says what to do about it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint
