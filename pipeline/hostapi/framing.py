"""The one framing of every byte stream between agents: pre-copy memory, file rounds and stop-copy images.

    frame   = header payload
    header  = tag:4s flags:u32 stored_len:u32 raw_len:u32 checksum:u64     (little endian, 24 bytes)
    payload = stored_len bytes; zstd-compressed when flags & 1, else raw; checksum = xxh3_64(payload)

A stream runs from a HEAD frame to an END frame, both JSON. HEAD names the format, its version and the
stream's kind, plus whatever its user adds (session, seq). END carries the sender's stats, the count of
earlier frames and `digest`, SHA-256 over every earlier header. Each header holds its payload's checksum,
so the digest pins every byte, and a dropped, repeated or reordered frame is caught as surely as a
flipped one. Both ends know the digest, which makes it the stream's identity (`StreamStats.sha256`).

Each user declares a `Format`: its name, version, kinds and body tags. What the frames carry is the
user's business; this module only moves bytes and refuses anything damaged, truncated or foreign.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import xxhash
import zstandard
from skyferry.pipeline.errors import SkyferryError

HEADER = struct.Struct("<4sIIIQ")
ZSTD = 1
MAX_FRAME = 64 << 20
HEAD = b"HEAD"
END = b"END_"
MIN_COMPRESS = 256  # smaller payloads (most HEADs) travel raw: zstd cannot win there
# A payload this large is sampled first (PROBE_PARTS pieces of PROBE_BYTES, spread over it), and travels
# raw if zstd cannot shrink the sample to PROBE_KEEP of itself: incompressible memory then costs 1/64 of
# a full pass (zstd spent 53 ms per 64 MiB of random pages, 5 % of a source agent's CPU in an evacuation).
PROBE_MIN = 512 << 10
PROBE_PARTS, PROBE_BYTES = 8, 8 << 10
PROBE_KEEP = 0.95


class StreamError(SkyferryError):
    """A stream that is damaged, truncated, out of order or from another migration."""


@dataclass(frozen=True)
class Format:
    """One kind of stream: what its HEAD must say and which body tags it may hold."""

    name: str
    version: int
    kinds: frozenset[str]
    tags: frozenset[bytes]
    what: str  # names the stream in errors: "pre-copy stream"
    hint: str  # what to do when a stream of this format is refused

    def error(self, message: str) -> StreamError:
        return StreamError(f"{self.what} rejected: {message}", hint=self.hint)


class FrameWriter:
    """Builds one stream's frames; compresses each payload unless zstd cannot shrink it."""

    def __init__(self, fmt: Format, level: int = 1, threads: int = 0) -> None:
        self.fmt = fmt
        self._zstd = zstandard.ZstdCompressor(level=level, threads=threads)
        self._digest = hashlib.sha256()
        self.frames = 0
        self.bytes_out = 0
        self.digest = ""  # hex, once end() has run

    def head(self, kind: str, **fields: Any) -> bytes:
        head = {**fields, "format": self.fmt.name, "version": self.fmt.version, "kind": kind}
        return self.frame(HEAD, json.dumps(head, sort_keys=True).encode())

    def frame(self, tag: bytes, raw: bytes | bytearray | memoryview, compress: bool = True) -> bytes:
        flags, body = 0, raw
        if compress and len(raw) > MIN_COMPRESS and self._shrinks(raw):
            packed = self._zstd.compress(raw)
            if len(packed) < len(raw):
                flags, body = ZSTD, packed
        header = HEADER.pack(tag, flags, len(body), len(raw), xxhash.xxh3_64_intdigest(body))
        self._digest.update(header)
        self.frames += 1
        out = header + body
        self.bytes_out += len(out)
        return out

    def _shrinks(self, raw: bytes | bytearray | memoryview) -> bool:
        """Whether zstd is worth running over the whole payload: a small one, or one whose sample shrinks."""
        if len(raw) < PROBE_MIN:
            return True
        mv, step = memoryview(raw).cast("B"), len(raw) // PROBE_PARTS
        sample = b"".join(mv[i * step : i * step + PROBE_BYTES] for i in range(PROBE_PARTS))
        return len(self._zstd.compress(sample)) < PROBE_KEEP * len(sample)

    def end(self, meta: dict[str, Any]) -> bytes:
        self.digest = self._digest.hexdigest()
        raw = json.dumps({**meta, "frames": self.frames, "digest": self.digest}, sort_keys=True).encode()
        header = HEADER.pack(END, 0, len(raw), len(raw), xxhash.xxh3_64_intdigest(raw))
        self.bytes_out += len(header) + len(raw)
        return header + raw


class FrameReader:
    """Reads one stream: `head()` (checked against the format), then iterate for (tag, payload) of every
    body frame. END is checked, not yielded. Chunks may split frames anywhere, as a socket would."""

    def __init__(self, chunks: Iterable[bytes], fmt: Format) -> None:
        self.fmt = fmt
        self._chunks = iter(chunks)
        self._buf = bytearray()
        self._zstd = zstandard.ZstdDecompressor()
        self._digest = hashlib.sha256()
        self._head: dict[str, Any] | None = None
        self.frames = 0
        self.bytes_in = 0
        self.digest = ""  # hex, once END has been checked

    def head(self) -> dict[str, Any]:
        if self._head is None:
            head = self._json(self._next())  # frame 0 is always a HEAD (_next checks)
            if head.get("format") != self.fmt.name:
                raise self.fmt.error(f"it is not a {self.fmt.name} stream")
            if head.get("version") != self.fmt.version:
                raise self.fmt.error(
                    f"format version {head.get('version')} is not {self.fmt.version}; upgrade both agents"
                )
            if not isinstance(head.get("kind"), str) or head["kind"] not in self.fmt.kinds:
                raise self.fmt.error(f"unknown stream kind {head.get('kind')!r}")
            self._head = head
        return self._head

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        self.head()
        while (frame := self._next())[0] != END:
            yield frame
        end = self._json(frame)
        if end.get("frames") != self.frames or end.get("digest") != self._digest.hexdigest():
            raise self.fmt.error("frames are missing, repeated or out of order")
        if self._buf or self._need(1):
            raise self.fmt.error("bytes follow the END frame")
        self.digest = end["digest"]

    def _next(self) -> tuple[bytes, bytes]:
        """The next frame, its checksum and size checked; END's payload is returned raw, not counted."""
        n = self.frames
        if not self._need(HEADER.size):
            raise self.fmt.error("it ended before its END frame (truncated)")
        tag, flags, stored, raw_len, checksum = HEADER.unpack_from(self._buf)
        known = tag in self.fmt.tags or tag == HEAD or (tag == END and flags == 0 and raw_len == stored)
        if not known or flags & ~ZSTD or max(stored, raw_len) > MAX_FRAME:
            raise self.fmt.error(f"frame {n} has a damaged header")
        if (n == 0) != (tag == HEAD):
            raise self.fmt.error("it does not start with a HEAD frame" if n == 0 else f"frame {n} is a second HEAD")
        if not self._need(HEADER.size + stored):
            raise self.fmt.error("it ended inside a frame (truncated)")
        with memoryview(self._buf) as mv:
            header = bytes(mv[: HEADER.size])
            body = bytes(mv[HEADER.size : HEADER.size + stored])
        del self._buf[: HEADER.size + stored]
        if xxhash.xxh3_64_intdigest(body) != checksum:
            raise self.fmt.error(f"frame {n} ({tag.decode(errors='replace')}) is corrupt: checksum mismatch")
        if tag == END:
            return tag, body
        self._digest.update(header)
        self.frames += 1
        if not flags & ZSTD:
            payload = body
        else:
            try:
                payload = self._zstd.decompress(body, max_output_size=raw_len)
            except zstandard.ZstdError as exc:
                raise self.fmt.error(f"frame {n} does not decompress: {exc}") from None
        if len(payload) != raw_len:
            raise self.fmt.error(f"frame {n} decompresses to the wrong size")
        return tag, payload

    def _need(self, n: int) -> bool:
        while len(self._buf) < n:
            chunk = next(self._chunks, None)
            if chunk is None:
                return False
            self._buf.extend(chunk)
            self.bytes_in += len(chunk)
        return True

    def _json(self, frame: tuple[bytes, bytes]) -> dict[str, Any]:
        try:
            obj = json.loads(frame[1])
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            raise self.fmt.error(f"its {frame[0].decode()} frame is not a JSON object")
        return obj
