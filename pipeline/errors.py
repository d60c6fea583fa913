"""The one exception type the pipeline raises for problems a user can act on."""


class SkyferryError(Exception):
    """A failure with a message fit for an operator; `hint` says what to do about it, and `log` holds the
    tail of the failing tool's own log (CRIU's, runc's) for the migration journal."""

    def __init__(self, message: str, hint: str | None = None, log: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint
        self.log = log


class CarriedRestore(SkyferryError):
    """A transfer that was to end with the target's restore failed; `restore` says how far it got (the
    agent's error JSON carries it as "restore")."""

    restore = ""


class NotRestored(CarriedRestore):
    """It failed before it asked the target to restore: nothing there can have gone live, so a rollback
    need not reach the target before it thaws the source."""

    restore = "not asked"


class RestoreFailed(CarriedRestore):
    """Every byte arrived and the target's restore failed (CRIU never resumed the copy): it says why."""

    restore = "failed"


CARRIED = {e.restore: e for e in (NotRestored, RestoreFailed)}
