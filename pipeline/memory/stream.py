"""The pre-copy wire format: checksummed, zstd-compressed frames, from a HEAD frame to an END frame.

    frame   = header payload
    header  = tag:4s flags:u32 stored_len:u32 raw_len:u32 checksum:u64     (little endian, 24 bytes)
    payload = stored_len bytes; zstd-compressed when flags & 1, else raw; checksum = xxh3_64(payload)

HEAD (JSON) names the format, version, kind ("round" or "final"), session and sequence number.
END (JSON) carries the frame count and xxh3_64 over every earlier frame header, so a dropped,
repeated or reordered frame is caught as surely as a flipped byte. Frame bodies are in
precopy.py; this module only moves bytes and refuses anything damaged.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from typing import Any

import xxhash
import zstandard
from skyferry.pipeline.errors import SkyferryError

FORMAT = "skyferry-precopy"
VERSION = 1
HEADER = struct.Struct("<4sIIIQ")
ZSTD = 1
MAX_FRAME = 64 << 20
TAGS = {b"HEAD", b"PAGE", b"FILE", b"PMAP", b"CLEN", b"END_"}


class StreamError(SkyferryError):
    """A pre-copy stream that is damaged, truncated, out of order or from another migration."""

    def __init__(self, message: str) -> None:
        super().__init__(
            f"pre-copy stream rejected: {message}",
            hint="nothing was restored from it; resend from a fresh round (SourceEngine.reset, TargetStore.reset)",
        )


class FrameWriter:
    """Builds frames; compresses each payload unless zstd cannot shrink it."""

    def __init__(self, level: int = 1) -> None:
        self._zstd = zstandard.ZstdCompressor(level=level)
        self._digest = xxhash.xxh3_64()
        self.frames = 0
        self.bytes_out = 0

    def frame(self, tag: bytes, raw: bytes | memoryview, compress: bool = True) -> bytes:
        flags, body = 0, raw
        if compress and len(raw) > 256:
            packed = self._zstd.compress(raw)
            if len(packed) < len(raw):
                flags, body = ZSTD, packed
        header = HEADER.pack(tag, flags, len(body), len(raw), xxhash.xxh3_64_intdigest(body))
        self._digest.update(header)
        self.frames += 1
        out = header + body
        self.bytes_out += len(out)
        return out

    def json(self, tag: bytes, obj: dict[str, Any]) -> bytes:
        return self.frame(tag, json.dumps(obj, sort_keys=True).encode(), compress=False)

    def head(self, kind: str, session: str, seq: int) -> bytes:
        return self.json(b"HEAD", {"format": FORMAT, "version": VERSION, "kind": kind, "session": session, "seq": seq})

    def end(self, meta: dict[str, Any]) -> bytes:
        body = {**meta, "frames": self.frames, "digest": self._digest.hexdigest()}
        raw = json.dumps(body, sort_keys=True).encode()
        header = HEADER.pack(b"END_", 0, len(raw), len(raw), xxhash.xxh3_64_intdigest(raw))
        self.bytes_out += len(header) + len(raw)
        return header + raw


def read_frames(chunks: Iterable[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """Yield (tag, payload) for every frame, HEAD first; END is checked, not yielded.

    Chunks may split frames anywhere, as a socket would. Raises StreamError on any damage.
    """
    zstd = zstandard.ZstdDecompressor()
    digest = xxhash.xxh3_64()
    buf = bytearray()
    it = iter(chunks)
    count = 0

    def need(n: int) -> bool:
        while len(buf) < n:
            try:
                buf.extend(next(it))
            except StopIteration:
                return False
        return True

    while True:
        if not need(HEADER.size):
            raise StreamError("it ended before its END frame (truncated)")
        tag, flags, stored, raw_len, checksum = HEADER.unpack_from(buf)
        if tag not in TAGS or flags & ~ZSTD or stored > MAX_FRAME or raw_len > MAX_FRAME:
            raise StreamError(f"frame {count} has a damaged header")
        if count == 0 and tag != b"HEAD":
            raise StreamError("it does not start with a HEAD frame")
        if not need(HEADER.size + stored):
            raise StreamError("it ended inside a frame (truncated)")
        header = bytes(buf[: HEADER.size])
        body = bytes(buf[HEADER.size : HEADER.size + stored])
        del buf[: HEADER.size + stored]
        if xxhash.xxh3_64_intdigest(body) != checksum:
            raise StreamError(f"frame {count} ({tag.decode()}) fails its checksum")
        if tag == b"END_":
            end = json.loads(body)
            if end.get("frames") != count or end.get("digest") != digest.hexdigest():
                raise StreamError("frames are missing, repeated or out of order")
            if buf or need(1):
                raise StreamError("bytes follow the END frame")
            return
        digest.update(header)
        payload = zstd.decompress(body, max_output_size=raw_len) if flags & ZSTD else body
        if len(payload) != raw_len:
            raise StreamError(f"frame {count} decompresses to the wrong size")
        if count == 0:
            check_head(json.loads(payload))
        count += 1
        yield tag, payload


def check_head(head: dict[str, Any]) -> None:
    if head.get("format") != FORMAT:
        raise StreamError("it is not a skyferry pre-copy stream")
    if head.get("version") != VERSION:
        raise StreamError(f"format version {head.get('version')} is not {VERSION}; upgrade both agents")
