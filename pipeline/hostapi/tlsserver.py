"""The HTTPS server under the agent and the controller's enrolment service."""

import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from skyferry.pipeline.hostapi.client import bound_stalls, size_buffers

log = logging.getLogger(__name__)


class TLSServer(ThreadingHTTPServer):
    """An HTTPS server whose TLS handshakes run in the request's own thread.

    `ctx` may be a function giving the context to use for the next connection: an agent's certificate
    is then replaced (`mesh rotate`) without a restart. `check` sees each peer after its handshake and
    refuses it by raising ssl.SSLError (a revoked certificate: hostapi/revocation.py); `recheck` runs it
    again on every connection still open (a kept-alive one from a peer revoked since)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        ctx: ssl.SSLContext | Callable[[], ssl.SSLContext],
        check: Callable[[ssl.SSLSocket], None] | None = None,
    ) -> None:
        super().__init__(address, handler)
        self.ctx = ctx
        self.check = check
        self._open: set[ssl.SSLSocket] = set()
        self._open_lock = threading.Lock()

    def server_bind(self) -> None:
        size_buffers(self.socket)  # before listen(): the window scale it offers depends on the buffer
        super().server_bind()

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = self.socket.accept()
        sock.settimeout(600)
        bound_stalls(sock)  # a receive from a peer that vanished must not hold the container's lock
        # A reply goes out as headers, then body: with Nagle the body waited for the ACK of the headers
        # (a round trip plus the peer's delayed ACK: 70 ms per call across a 30 ms WAN, in the freeze).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The handshake happens in the worker thread, so a slow or hostile client cannot block accept().
        ctx = self.ctx() if callable(self.ctx) else self.ctx
        return ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            request.do_handshake()
            if self.check is not None:
                self.check(request)
        except (ssl.SSLError, OSError) as exc:
            log.warning("refused %s: %s", client_address[0], exc)
            return
        with self._open_lock:
            self._open.add(request)
        try:
            super().finish_request(request, client_address)
        finally:
            with self._open_lock:
                self._open.discard(request)

    def recheck(self) -> int:
        """Cut every open connection whose peer `check` now refuses; returns how many."""
        if self.check is None:
            return 0
        with self._open_lock:
            open_now = list(self._open)
        cut = 0
        for sock in open_now:
            try:
                self.check(sock)
            except ssl.SSLError as exc:
                log.warning("cut a connection open since before: %s", exc)
                # The plain socket's shutdown: the handler thread's next TLS read then sees the end.
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                cut += 1
        return cut
