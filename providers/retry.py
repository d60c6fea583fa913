"""Bounded retries for throttling and eventual consistency (tenacity), shared by the cloud providers."""

from collections.abc import Callable
from typing import TypeVar

from tenacity import retry, retry_if_exception, stop_after_attempt, stop_after_delay, wait_exponential

T = TypeVar("T")

# Throttling and the brief window in which a new resource is not yet visible everywhere.
TRANSIENT_MARKERS = (
    "RequestLimitExceeded", "Throttling", "ThrottlingException", "InvalidInstanceID.NotFound",
    "rateLimitExceeded", "userRateLimitExceeded", "backendError", "Connection reset", "Connection refused",
)  # fmt: skip


def is_transient(exc: BaseException) -> bool:
    text = f"{exc} {getattr(exc, 'code', '')}"  # libcloud's Google errors keep the reason in .code
    return isinstance(exc, ConnectionError) or any(m in text for m in TRANSIENT_MARKERS)


def transient(
    fn: Callable[..., T], attempts: int = 5, when: Callable[[BaseException], bool] = is_transient
) -> Callable[..., T]:
    """`fn` retried up to `attempts` times, 0.5 s doubling to 8 s between tries, for transient errors only."""
    return retry(
        retry=retry_if_exception(when),
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=0.5, max=8),
        reraise=True,
    )(fn)


def until(fn: Callable[[], T], timeout: float, when: Callable[[BaseException], bool]) -> T:
    """Call `fn` until it stops raising errors that `when` accepts, for at most `timeout` seconds."""
    return retry(
        retry=retry_if_exception(when),
        stop=stop_after_delay(timeout),
        wait=wait_exponential(multiplier=0.25, max=5),
        reraise=True,
    )(fn)()
