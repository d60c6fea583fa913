"""Plan names, the tags/labels that carry them, and the names of the hosts a plan owns."""

import re
from collections.abc import Callable

from .errors import ProviderError

PLAN_TAG = "skyferry-plan"
HOST_TAG = "skyferry-host"
# GCE instance names and label values are the strictest: lowercase, digits, '-', starting with a letter.
_PLAN = re.compile(r"[a-z][a-z0-9-]{0,39}")


def check_plan(plan: str) -> str:
    if not _PLAN.fullmatch(plan):
        raise ProviderError(
            f"invalid plan name {plan!r}",
            hint="use 1-40 lowercase letters, digits or '-', starting with a letter (GCE naming rules)",
        )
    return plan


def host_name(plan: str, index: int) -> str:
    return f"{plan}-{index}"


def missing_names(plan: str, existing: list[str], count: int, first: int = 0) -> list[str]:
    """Names for the hosts to create so that `count` exist, numbered from `first`, filling gaps left by
    earlier deletes."""
    taken, names, i = set(existing), [], first
    while len(taken) + len(names) < count:
        if host_name(plan, i) not in taken:
            names.append(host_name(plan, i))
        i += 1
    return names


# User-data for one host: the same document for every host, or rendered per host name (cloud-init does
# that, because each host gets its own WireGuard key and overlay address).
UserData = str | Callable[[str], str] | None


def user_data_for(user_data: UserData, name: str) -> str | None:
    return user_data(name) if callable(user_data) else user_data
