"""The agents' one stream framing (hostapi/framing.py) on its own, and the stop-copy tar that rides on it.

Whatever a stream goes through, the reader either returns exactly what was written or raises StreamError.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from skyferry.pipeline.files import wire
from skyferry.pipeline.hostapi.framing import Format, FrameReader, FrameWriter, StreamError

FMT = Format("skyferry-test", 3, frozenset({"round"}), frozenset({b"DATA", b"MORE"}), "test stream", "try again")
OTHER = Format("skyferry-other", 3, frozenset({"round"}), frozenset({b"DATA", b"MORE"}), "other stream", "no")

payloads = st.lists(
    st.tuples(st.sampled_from([b"DATA", b"MORE"]), st.binary(max_size=2000) | st.just(b"z" * 5000)),
    max_size=6,
)


def stream(frames: list[tuple[bytes, bytes]], session: str = "s1", fmt: Format = FMT) -> list[bytes]:
    """HEAD, one element per frame, END."""
    w = FrameWriter(fmt)
    return [w.head("round", session=session, seq=1), *(w.frame(t, p) for t, p in frames), w.end({"n": len(frames)})]


def read(chunks: Iterable[bytes], fmt: Format = FMT) -> tuple[dict, list[tuple[bytes, bytes]], FrameReader]:
    reader = FrameReader(chunks, fmt)
    head = reader.head()
    return head, list(reader), reader


def pieces(blob: bytes, size: int) -> list[bytes]:
    return [blob[i : i + size] for i in range(0, len(blob), size)]


@settings(max_examples=60, deadline=None)
@given(frames=payloads, size=st.integers(1, 9000))
def test_a_good_stream_round_trips_in_any_chunking(frames: list[tuple[bytes, bytes]], size: int) -> None:
    w = FrameWriter(FMT)
    blob = b"".join([w.head("round", session="s1", seq=7), *(w.frame(t, p) for t, p in frames), w.end({})])
    head, got, reader = read(pieces(blob, size))
    assert (head["format"], head["version"], head["kind"], head["session"], head["seq"]) == (
        "skyferry-test",
        3,
        "round",
        "s1",
        7,
    )
    assert got == frames
    assert (reader.digest, reader.bytes_in, reader.frames) == (w.digest, w.bytes_out, len(frames) + 1)
    assert len(w.digest) == 64  # SHA-256 hex: what StreamStats.sha256 carries


def test_payloads_are_compressed_only_when_that_helps() -> None:
    w = FrameWriter(FMT)
    assert len(w.frame(b"DATA", b"z" * 100_000)) < 1000
    noise = os.urandom(100_000)
    assert len(w.frame(b"DATA", noise)) == 24 + len(noise)


class _Counting:
    """The writer's real compressor, counting the bytes it is given."""

    def __init__(self, inner: zstandard.ZstdCompressor) -> None:
        self.inner, self.fed = inner, 0

    def compress(self, data: bytes) -> bytes:
        self.fed += len(data)
        return self.inner.compress(data)


def test_a_large_incompressible_payload_is_judged_by_a_sample() -> None:
    w = FrameWriter(FMT)
    w._zstd = counting = _Counting(w._zstd)  # type: ignore[assignment]
    noise = os.urandom(4 << 20)  # one PAGE frame of random memory
    assert len(w.frame(b"DATA", noise)) == 24 + len(noise)
    assert counting.fed <= 64 << 10, "zstd ran over more than the sample"
    # Control: memory that compresses (random half pages beside zeros, as the bench's realistic memory)
    # still travels compressed, zstd over all of it.
    pages = b"".join(os.urandom(2048) + bytes(2048) for _ in range(1024))
    counting.fed = 0
    assert len(w.frame(b"DATA", pages)) < 0.6 * len(pages)
    assert counting.fed > len(pages)


@settings(max_examples=150, deadline=None)
@given(frames=payloads, data=st.data())
def test_any_flipped_byte_is_refused(frames: list[tuple[bytes, bytes]], data: st.DataObject) -> None:
    blob = bytearray(b"".join(stream(frames)))
    at = data.draw(st.integers(0, len(blob) - 1))
    blob[at] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(StreamError):
        read([bytes(blob)])


@settings(max_examples=100, deadline=None)
@given(frames=payloads, data=st.data())
def test_any_truncation_or_trailing_byte_is_refused(frames: list[tuple[bytes, bytes]], data: st.DataObject) -> None:
    blob = b"".join(stream(frames))
    cut = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(StreamError, match="truncated"):
        read([blob[:cut]])
    with pytest.raises(StreamError, match="bytes follow the END"):
        read([blob, b"\0"])


def test_dropped_repeated_reordered_and_foreign_frames_are_refused() -> None:
    frames = stream([(b"DATA", b"one" * 100), (b"MORE", b"two" * 100), (b"DATA", b"three" * 100)])
    head, body, end = frames[0], frames[1:-1], frames[-1]
    other = stream([(b"DATA", b"one" * 100), (b"MORE", b"TWO" * 100), (b"DATA", b"three" * 100)], session="s2")
    cases = {
        "dropped": [head, body[0], body[2], end],
        "repeated": [head, body[0], body[1], body[1], body[2], end],
        "reordered": [head, body[1], body[0], body[2], end],
        "another session's frame": [head, body[0], other[2], body[2], end],
    }
    for chunks in cases.values():
        with pytest.raises(StreamError, match="missing, repeated or out of order"):
            read(chunks)
    with pytest.raises(StreamError, match="does not start with a HEAD"):
        read([*body, end])
    with pytest.raises(StreamError, match="second HEAD"):
        read([head, *body, frames[0], end])
    with pytest.raises(StreamError, match="not a skyferry-test stream"):
        read(stream([], fmt=OTHER))
    newer = Format("skyferry-test", 4, FMT.kinds, FMT.tags, FMT.what, FMT.hint)
    with pytest.raises(StreamError, match="upgrade both agents"):
        read(stream([], fmt=newer))
    alien = FrameWriter(Format("skyferry-test", 3, FMT.kinds, frozenset({b"PAGE"}), "", ""))
    with pytest.raises(StreamError, match="damaged header"):
        read([alien.head("round"), alien.frame(b"PAGE", b"x"), alien.end({})])
    unknown = FrameWriter(FMT)
    with pytest.raises(StreamError, match="unknown stream kind"):
        read([unknown.head("final"), unknown.end({})])


def test_errors_name_the_stream_and_say_what_to_do() -> None:
    with pytest.raises(StreamError, match=r"^test stream rejected: it ended before its END frame") as err:
        read([])
    assert err.value.hint == "try again"


def test_stop_copy_round_trip_and_its_digest(tmp_path: Path) -> None:
    """wire.encode's tar in DATA frames: both ends agree on `sha256`; a flipped byte is refused."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "big").write_bytes(os.urandom(3 * wire.DATA_FRAME // 2) + bytes(wire.DATA_FRAME))
    (src / "sub" / "small").write_text("hello")
    (src / "link").symlink_to("sub/small")
    sent = wire.StreamStats()
    chunks = list(wire.encode({"images": src}, sent))
    assert len(chunks) >= 4  # HEAD, two DATA frames at least, END
    got = wire.StreamStats()
    wire.decode(io.BytesIO(b"".join(chunks)), {"images": tmp_path / "dst"}, got)
    assert (got.sha256, got.bytes_wire) == (sent.sha256, sent.bytes_wire)
    assert sent.bytes_raw == (src / "big").stat().st_size + 5
    assert (tmp_path / "dst" / "big").read_bytes() == (src / "big").read_bytes()
    assert os.readlink(tmp_path / "dst" / "link") == "sub/small"
    blob = bytearray(b"".join(chunks))
    blob[100] ^= 0xFF  # in the first DATA frame: refused at once
    body = io.BytesIO(bytes(blob))
    with pytest.raises(StreamError, match="corrupt"):
        wire.decode(body, {"images": tmp_path / "again"}, wire.StreamStats())
    assert body.tell() < len(blob)  # refused at the bad frame; the sender reads the answer (hostapi/client.py)
