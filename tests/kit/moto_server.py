"""moto 5.2.5 in server mode, with the response patches libcloud's EC2 driver needs.

Each patch fixes a place where moto differs from real EC2 (libcloud works against real EC2 as it is);
tests/providers/test_moto_patches.py turns each one off and shows libcloud breaking, so a moto upgrade
that fixes one makes that test fail and the patch can go. Fault injection (`fail_next`) returns the
error bodies real EC2 sends, for errors moto never produces (quota).
"""

import io
import re
from collections.abc import Callable, Iterable
from threading import Lock
from typing import Any
from urllib.parse import parse_qsl, urlencode

from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from moto.server import MotoRequestHandler
from werkzeug.serving import make_server

MOTO_VERSION = "5.2.5"
PATCHES = frozenset({"namespace", "tag_index", "return_true", "error_namespace"})

# Real EC2 answers with a trailing slash; libcloud's XPath lookups use that exact namespace.
_NS = re.compile(rb'xmlns="http://ec2\.amazonaws\.com/doc/(\d{4}-\d\d-\d\d)"')
# Real EC2 error bodies are not namespaced (<Response><Errors>…); libcloud reads them without one.
_ERR_NS = re.compile(rb'<Response xmlns="[^"]*">')
# Actions whose real response is <return>true</return>, which libcloud's _get_boolean reads.
_BOOLEAN_ACTIONS = {
    "CreateTags", "DeleteTags", "AuthorizeSecurityGroupIngress", "RevokeSecurityGroupIngress",
    "DeleteSecurityGroup", "DeleteKeyPair",
}  # fmt: skip

Environ = dict[str, Any]


def _renumber_tags(query: str) -> str:
    """Tag.0.Key → Tag.1.Key (and ResourceId.0): libcloud's CreateTags counts from 0, moto from 1."""
    pairs = parse_qsl(query, keep_blank_values=True)
    if not any(k.startswith(("Tag.0.", "ResourceId.0")) for k, _ in pairs):
        return query
    out = []
    for key, value in pairs:
        m = re.fullmatch(r"(Tag|ResourceId)\.(\d+)(\..*)?", key)
        if m:
            key = f"{m[1]}.{int(m[2]) + 1}{m[3] or ''}"
        out.append((key, value))
    return urlencode(out)


class Ec2Quirks:
    """WSGI middleware around moto's app: rewrites EC2 query requests and responses for libcloud."""

    def __init__(self, app: Callable[..., Iterable[bytes]], patches: Iterable[str]) -> None:
        self.app = app
        self.patches = frozenset(patches)
        self._faults: dict[str, list[tuple[int, str, str]]] = {}
        self._lock = Lock()
        self.actions: list[str] = []

    def fail_next(self, action: str, status: int, code: str, message: str, times: int = 1) -> None:
        with self._lock:
            self._faults.setdefault(action, []).extend([(status, code, message)] * times)

    def __call__(self, environ: Environ, start_response: Callable[..., Any]) -> Iterable[bytes]:
        params = dict(parse_qsl(environ.get("QUERY_STRING", "")))
        if environ.get("REQUEST_METHOD") == "POST" and "x-www-form-urlencoded" in environ.get("CONTENT_TYPE", ""):
            body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            params.update(parse_qsl(body.decode()))
            environ["wsgi.input"] = io.BytesIO(body)
        action = params.get("Action", "")
        is_ec2 = "/ec2/" in environ.get("HTTP_AUTHORIZATION", "") and bool(action)
        if not is_ec2:
            return self.app(environ, start_response)
        with self._lock:
            self.actions.append(action)
            fault = self._faults.get(action, []).pop(0) if self._faults.get(action) else None
        if fault:
            status, code, message = fault
            body = (
                f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{code}</Code>'
                f"<Message>{message}</Message></Error></Errors><RequestID>fault</RequestID></Response>"
            ).encode()
            start_response(f"{status} Error", [("Content-Type", "text/xml"), ("Content-Length", str(len(body)))])
            return [body]
        if "tag_index" in self.patches and action in ("CreateTags", "DeleteTags"):
            environ["QUERY_STRING"] = _renumber_tags(environ.get("QUERY_STRING", ""))

        captured: dict[str, Any] = {}

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            captured["status"], captured["headers"] = status, headers
            return lambda data: None

        body = b"".join(self.app(environ, capture))
        ok = captured["status"].startswith("2")
        if "namespace" in self.patches:
            body = _NS.sub(rb'xmlns="http://ec2.amazonaws.com/doc/\1/"', body)
        if "error_namespace" in self.patches and not ok:
            body = _ERR_NS.sub(b"<Response>", body)
        if "return_true" in self.patches and ok and action in _BOOLEAN_ACTIONS and b"<return>" not in body:
            body = re.sub(rb"(<requestId>)", rb"<return>true</return>\1", body, count=1)
        headers = [(k, v) for k, v in captured["headers"] if k.lower() != "content-length"]
        start_response(captured["status"], [*headers, ("Content-Length", str(len(body)))])
        return [body]


class PatchedMotoServer(ThreadedMotoServer):
    """ThreadedMotoServer on 127.0.0.1 and a free port, its app wrapped in Ec2Quirks."""

    def __init__(self, patches: Iterable[str] = PATCHES) -> None:
        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        self.quirks: Ec2Quirks | None = None
        self._patches = frozenset(patches)

    def _server_entry(self) -> None:  # same as moto's, plus the middleware
        self.quirks = Ec2Quirks(DomainDispatcherApplication(create_backend_app), self._patches)
        self._server = make_server(self._ip_address, self._port, self.quirks, True, request_handler=MotoRequestHandler)
        self._server_ready_event.set()
        self._server.serve_forever()

    @property
    def url(self) -> str:
        host, port = self.get_host_and_port()
        return f"http://{host}:{port}"
