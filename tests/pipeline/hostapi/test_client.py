"""The agent client's stream uploads, against a real mutual-TLS listener on loopback."""

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi import pki
from skyferry.pipeline.hostapi.client import AgentClient


def test_a_body_that_fails_part_way_hangs_up(tmp_path: Path) -> None:
    """When the producer of a streamed body raises after some chunks went out, the client must close the
    connection: the agent then reads a truncated stream and lets go of the container's lock. Kept open,
    the agent would wait for the next chunk for as long as the connection lives (found in the soft-dirty
    VM test: the rollback's abort on the target hung behind it)."""
    pki.ensure_ca(tmp_path / "ca", "t")
    ca = tmp_path / "ca"
    server = pki.issue(ca, tmp_path / "server", "server", ["127.0.0.1"], role=pki.HOST).server_context()
    client_ctx = pki.issue(ca, tmp_path / "client", "client", ["127.0.0.1"], role=pki.HOST).client_context()
    listener = socket.create_server(("127.0.0.1", 0))
    seen: dict[str, bytes | bool] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        with server.wrap_socket(conn, server_side=True) as tls:
            tls.settimeout(10)
            data = b""
            try:
                while chunk := tls.recv(65536):
                    data += chunk
                seen["eof"] = True
            except (TimeoutError, OSError):
                seen["eof"] = False
            seen["data"] = data

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def body() -> Iterator[bytes]:
        yield b"first chunk"
        raise SkyferryError("the dump failed")

    client = AgentClient("127.0.0.1", listener.getsockname()[1], client_ctx)
    with pytest.raises(SkyferryError, match="the dump failed"):
        client.upload("/v1/migrations/m/precopy-round?name=c", body())
    thread.join(15)
    listener.close()
    assert seen["eof"] is True, "the client left the half-sent stream open"
    assert b"first chunk" in seen["data"] and seen["data"].startswith(b"PUT /v1/migrations/m/precopy-round")
