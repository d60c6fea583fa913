"""The target's wait for a transfer's final streams, asked for before they landed (agent/finals.py)."""

import threading
import time

import pytest
from skyferry.pipeline.agent import finals
from skyferry.pipeline.agent.finals import Finals
from skyferry.pipeline.errors import NotRestored

STREAMS = ["precopy-final", "fs-round"]


def land(f: Finals, transfer: str, stream: str, after_s: float, fail: bool = False) -> threading.Thread:
    def run() -> None:
        time.sleep(after_s)
        try:
            with f.landing(transfer, stream):
                time.sleep(0.05)  # applying it
                if fail:
                    raise ValueError("frame checksum mismatch")
        except ValueError:
            pass

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_the_restore_waits_for_streams_that_land_after_it_was_asked() -> None:
    f = Finals()
    threads = [land(f, "t1", "precopy-final", 0.1), land(f, "t1", "fs-round", 0.2)]
    waited = f.wait("t1", STREAMS, deadline=time.time() + 10)
    assert waited >= 0.2  # it waited for the later one to be applied
    for thread in threads:
        thread.join()
    assert f.wait("t1", STREAMS, deadline=None) < 0.05  # landed already: no wait


def test_a_failed_stream_means_no_restore() -> None:
    f = Finals()
    threads = [land(f, "t1", "precopy-final", 0.0), land(f, "t1", "fs-round", 0.0, fail=True)]
    with pytest.raises(NotRestored, match=r"fs-round failed.*checksum"):
        f.wait("t1", STREAMS, deadline=None)
    for thread in threads:
        thread.join()


def test_an_earlier_transfer_s_streams_do_not_count() -> None:
    """A pre-copy round's fs-round (another transfer id, or none) never stands in for the final one."""
    f = Finals()
    for thread in [land(f, "t0", "precopy-final", 0.0), land(f, "t0", "fs-round", 0.0)]:
        thread.join()
    with f.landing(None, "fs-round"):
        pass
    threads = [land(f, "t1", "precopy-final", 0.0), land(f, "t1", "fs-round", 0.3)]
    assert f.wait("t1", STREAMS, deadline=None) >= 0.3
    for thread in threads:
        thread.join()


def test_a_stream_that_never_arrives_or_the_freeze_bound_ends_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(finals, "ARRIVE_S", 0.2)
    f = Finals()
    land(f, "t1", "precopy-final", 0.0).join()
    with pytest.raises(NotRestored, match="fs-round never arrived"):
        f.wait("t1", STREAMS, deadline=None)
    with pytest.raises(NotRestored, match="freeze bound"):
        f.wait("t2", STREAMS, deadline=time.time() - 1)
