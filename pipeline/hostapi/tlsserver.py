"""The HTTPS server under the agent and the controller's enrolment service."""

import logging
import socket
import ssl
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from skyferry.pipeline.hostapi.client import bound_stalls

log = logging.getLogger(__name__)


class TLSServer(ThreadingHTTPServer):
    """An HTTPS server whose TLS handshakes run in the request's own thread."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], ctx: ssl.SSLContext) -> None:
        super().__init__(address, handler)
        self.ctx = ctx

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = self.socket.accept()
        sock.settimeout(600)
        bound_stalls(sock)  # a receive from a peer that vanished must not hold the container's lock
        # A reply goes out as headers, then body: with Nagle the body waited for the ACK of the headers
        # (a round trip plus the peer's delayed ACK: 70 ms per call across a 30 ms WAN, in the freeze).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The handshake happens in the worker thread, so a slow or hostile client cannot block accept().
        return self.ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            request.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            log.warning("refused %s: %s", client_address[0], exc)
            return
        super().finish_request(request, client_address)
