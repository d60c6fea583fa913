"""A stateful fake of the GCE Compute REST API (v1) and Google's OAuth token endpoint, on 127.0.0.1.

There is no GCE emulator on the registries this project can use, so the GCP tests run the real libcloud
GCE driver and the real google-cloud-compute client against this. It keeps instances, disks, firewalls
and operations; operations answer RUNNING first and DONE on the next poll; errors use the bodies GCE
sends (notFound 404, UNAUTHENTICATED 401, alreadyExists 409, QUOTA_EXCEEDED in a DONE operation);
every request is recorded so tests can check the sequence each client sends.
"""

import base64
import itertools
import json
import re
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

ZONES = {"us-central1-a": "us-central1", "us-central1-b": "us-central1", "europe-west1-b": "europe-west1"}
MACHINE_TYPES = {"e2-micro": 2, "e2-small": 2, "e2-medium": 2, "n2-standard-2": 2, "n2-standard-4": 4}
IMAGE_FAMILIES = {("debian-cloud", "debian-12"), ("ubuntu-os-cloud", "ubuntu-2404-lts-amd64")}
V1 = "https://www.googleapis.com/compute/v1"


def new_service_account(project: str, token_uri: str) -> tuple[dict[str, Any], rsa.RSAPublicKey]:
    """A service-account JSON like the console's, with a fresh key; the fake trusts the public half."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    info = {
        "type": "service_account",
        "project_id": project,
        "private_key_id": secrets.token_hex(20),
        "private_key": pem,
        "client_email": f"skyferry-test@{project}.iam.gserviceaccount.com",
        "client_id": str(10**20 + secrets.randbelow(10**20)),
        "token_uri": token_uri,
    }
    return info, key.public_key()


def _b64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def error(code: int, message: str, reason: str, status: str) -> dict[str, Any]:
    return {
        "error": {
            "code": code,
            "message": message,
            "errors": [{"message": message, "domain": "global", "reason": reason}],
            "status": status,
        }
    }


class GceFake:
    def __init__(self, project: str) -> None:
        self.project = project
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []  # (method, path without /compute/v1/projects/<p>)
        self.trusted: dict[str, rsa.RSAPublicKey] = {}  # client_email -> public key
        self.tokens: set[str] = set()
        self.instances: dict[str, dict[str, Any]] = {}  # name -> resource
        self.disks: dict[str, dict[str, Any]] = {}
        self.firewalls: dict[str, dict[str, Any]] = {}
        self.operations: dict[str, dict[str, Any]] = {}
        self.cpu_quota = 8  # per project, like GCE's regional CPUS quota
        self.faults: list[tuple[str, int, str, str]] = []  # (request prefix, status, reason, message)
        self._ids = itertools.count(1000000000000000000 + secrets.randbelow(10**15))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "GceFake":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def trust(self, email: str, public_key: rsa.RSAPublicKey) -> None:
        self.trusted[email] = public_key

    def fail_next(self, request: str, status: int, reason: str, message: str, times: int = 1) -> None:
        """Answer the next `times` requests starting with `request` ("POST zones/…") with this error."""
        self.faults.extend([(request, status, reason, message)] * times)

    def calls(self, since: int = 0) -> list[str]:
        return [f"{m} {p}" for m, p in self.requests[since:]]

    # --- resources -------------------------------------------------------------------------------------

    def _link(self, path: str) -> str:
        return f"{V1}/projects/{self.project}/{path}"

    def _operation(self, kind: str, target: str, scope: str, error: dict[str, Any] | None = None) -> dict[str, Any]:
        name = f"operation-{int(time.time() * 1000)}-{secrets.token_hex(6)}"
        where = f"zones/{scope}" if scope in ZONES else "global"
        op = {
            "kind": "compute#operation",
            "id": str(next(self._ids)),
            "name": name,
            "operationType": kind,
            "targetLink": target,
            "status": "RUNNING",
            "progress": 0,
            "insertTime": time.strftime("%Y-%m-%dT%H:%M:%S.000-00:00"),
            "selfLink": self._link(f"{where}/operations/{name}"),
            "_polls": 0,
            "_error": error,
        }
        if scope in ZONES:
            op["zone"] = self._link(f"zones/{scope}")
        self.operations[name] = op
        return self._public(op)

    def _public(self, op: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in op.items() if not k.startswith("_")}

    def _poll(self, name: str) -> dict[str, Any] | None:
        op = self.operations.get(name)
        if op is None:
            return None
        op["_polls"] += 1
        if op["_polls"] >= 2 and op["status"] != "DONE":  # RUNNING once, then DONE
            op.update(status="DONE", progress=100, endTime=time.strftime("%Y-%m-%dT%H:%M:%S.000-00:00"))
            if op["_error"]:
                op["error"] = {"errors": [op["_error"]]}
                op.update(httpErrorStatusCode=403, httpErrorMessage="FORBIDDEN")
        return self._public(op)

    def _insert_instance(self, zone: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        name = body.get("name", "")
        if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name):
            return 400, error(400, f"Invalid value for field 'resource.name': '{name}'.", "invalid", "INVALID_ARGUMENT")
        if name in self.instances:
            msg = f"The resource 'projects/{self.project}/zones/{zone}/instances/{name}' already exists"
            return 409, error(409, msg, "alreadyExists", "ALREADY_EXISTS")
        mtype = body.get("machineType", "").rsplit("/", 1)[-1]
        if mtype not in MACHINE_TYPES:
            msg = f"Invalid value for field 'resource.machineType': '{body.get('machineType')}'."
            return 400, error(400, msg, "invalid", "INVALID_ARGUMENT")
        target = self._link(f"zones/{zone}/instances/{name}")
        used = sum(MACHINE_TYPES[i["machineType"].rsplit("/", 1)[-1]] for i in self.instances.values())
        if used + MACHINE_TYPES[mtype] > self.cpu_quota:
            region = ZONES[zone]
            quota_error = {
                "code": "QUOTA_EXCEEDED",
                "message": f"Quota 'CPUS' exceeded.  Limit: {self.cpu_quota}.0 in region {region}.",
            }
            return 200, self._operation("insert", target, zone, quota_error)
        iid = str(next(self._ids))
        disk_name = name
        disk = {
            "kind": "compute#disk",
            "id": str(next(self._ids)),
            "name": disk_name,
            "sizeGb": "10",
            "zone": self._link(f"zones/{zone}"),
            "status": "READY",
            "selfLink": self._link(f"zones/{zone}/disks/{disk_name}"),
            "sourceImage": body.get("disks", [{}])[0].get("initializeParams", {}).get("sourceImage"),
            "type": self._link(f"zones/{zone}/diskTypes/pd-standard"),
            "users": [target],
        }
        self.disks[disk_name] = disk
        n = len(self.instances) + 2
        self.instances[name] = {
            "kind": "compute#instance",
            "id": iid,
            "creationTimestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000-00:00"),
            "name": name,
            "tags": {**body.get("tags", {}), "fingerprint": base64.b64encode(secrets.token_bytes(8)).decode()},
            "labels": body.get("labels", {}),
            "labelFingerprint": base64.b64encode(secrets.token_bytes(8)).decode(),
            "machineType": self._link(f"zones/{zone}/machineTypes/{mtype}"),
            "status": "RUNNING",
            "zone": self._link(f"zones/{zone}"),
            "canIpForward": False,
            "networkInterfaces": [
                {
                    "network": self._link("global/networks/default"),
                    "networkIP": f"10.128.0.{n}",
                    "name": "nic0",
                    "accessConfigs": [{"type": "ONE_TO_ONE_NAT", "name": "External NAT", "natIP": f"198.51.100.{n}"}],
                }
            ],
            "disks": [
                {
                    "kind": "compute#attachedDisk",
                    "type": "PERSISTENT",
                    "mode": "READ_WRITE",
                    "source": disk["selfLink"],
                    "deviceName": disk_name,
                    "index": 0,
                    "boot": True,
                    "autoDelete": True,
                }
            ],
            "metadata": {**body.get("metadata", {}), "fingerprint": "abc=", "kind": "compute#metadata"},
            "serviceAccounts": body.get("serviceAccounts", []),
            "selfLink": target,
            "scheduling": {"onHostMaintenance": "MIGRATE", "automaticRestart": True, "preemptible": False},
        }
        return 200, self._operation("insert", target, zone)

    # --- HTTP ------------------------------------------------------------------------------------------

    def _token(self, form: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        """Google's JWT-bearer grant: checks the assertion's RS256 signature against a trusted key."""
        try:
            self._verify(form["assertion"][0])
        except Exception:
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
        token = "ya29.fake-" + secrets.token_urlsafe(24)
        self.tokens.add(token)
        return 200, {"access_token": token, "token_type": "Bearer", "expires_in": 3599}

    def _verify(self, jwt: str) -> dict[str, Any]:
        header, claims, sig = jwt.split(".")
        body = json.loads(_b64(claims))
        self.trusted[body["iss"]].verify(_b64(sig), f"{header}.{claims}".encode(), padding.PKCS1v15(), hashes.SHA256())
        if body["exp"] < time.time():
            raise ValueError("expired")
        return body

    def _self_signed_ok(self, bearer: str) -> bool:
        """Google APIs also take a JWT the service account signed itself (google-auth sends one)."""
        try:
            self._verify(bearer)
        except Exception:
            return False
        return True

    def handle(self, method: str, raw_path: str, headers: Any, body: bytes) -> tuple[int, dict[str, Any]]:
        url = urlsplit(raw_path)
        path = url.path
        if method == "POST" and path in ("/o/oauth2/token", "/token"):
            with self.lock:
                self.requests.append((method, path))
                return self._token(parse_qs(body.decode()))
        prefix = f"/compute/v1/projects/{self.project}/"
        rel = path.removeprefix(prefix) if path.startswith(prefix) else path.removeprefix("/compute/v1/")
        with self.lock:
            self.requests.append((method, rel))
            bearer = headers.get("Authorization", "").removeprefix("Bearer ")
            if bearer not in self.tokens and not self._self_signed_ok(bearer):
                msg = (
                    "Request is missing required authentication credential. Expected OAuth 2 access token, "
                    "login cookie or other valid authentication credential."
                )
                return 401, error(401, msg, "required", "UNAUTHENTICATED")
            if path.startswith("/compute/v1/projects/") and not path.startswith(prefix) and "global/images" not in path:
                other = path.split("/")[4]
                return 403, error(
                    403, f"Required 'compute.instances.list' permission for 'projects/{other}'", "forbidden",
                    "PERMISSION_DENIED",
                )  # fmt: skip
            for fault in self.faults:
                if f"{method} {rel}".startswith(fault[0]):
                    self.faults.remove(fault)
                    return fault[1], error(fault[1], fault[3], fault[2], "RESOURCE_EXHAUSTED")
            data = json.loads(body) if body else {}
            return self._route(method, rel, data)

    def _route(self, method: str, rel: str, data: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        def not_found(what: str) -> tuple[int, dict[str, Any]]:
            return 404, error(404, f"The resource '{what}' was not found", "notFound", "NOT_FOUND")

        parts = rel.split("/")
        proj = f"projects/{self.project}"
        if rel == "zones":
            items = [
                {"kind": "compute#zone", "id": str(2000 + i), "name": z, "status": "UP",
                 "region": self._link(f"regions/{r}"), "selfLink": self._link(f"zones/{z}"), "description": z}
                for i, (z, r) in enumerate(ZONES.items())
            ]  # fmt: skip
            return 200, {"kind": "compute#zoneList", "items": items, "selfLink": self._link("zones")}
        if rel == "regions" or (parts[0] == "regions" and len(parts) == 2):
            regions = sorted(set(ZONES.values()))
            items = [
                {"kind": "compute#region", "id": str(1000 + i), "name": r, "status": "UP",
                 "zones": [self._link(f"zones/{z}") for z, zr in ZONES.items() if zr == r],
                 "quotas": [{"metric": "CPUS", "limit": float(self.cpu_quota), "usage": 0.0}],
                 "selfLink": self._link(f"regions/{r}"), "description": r}
                for i, r in enumerate(regions)
            ]  # fmt: skip
            if len(parts) == 2:
                found = [r for r in items if r["name"] == parts[1]]
                return (200, found[0]) if found else not_found(f"{proj}/regions/{parts[1]}")
            return 200, {"kind": "compute#regionList", "items": items}
        if parts[0] == "zones" and len(parts) >= 2 and parts[1] not in ZONES:
            return not_found(f"{proj}/zones/{parts[1]}")
        if parts[0] == "zones" and len(parts) == 4 and parts[2] == "machineTypes" and method == "GET":
            if parts[3] not in MACHINE_TYPES:
                return not_found(f"{proj}/zones/{parts[1]}/machineTypes/{parts[3]}")
            return 200, {
                "kind": "compute#machineType", "id": str(3000 + len(parts[3])), "name": parts[3],
                "guestCpus": MACHINE_TYPES[parts[3]], "memoryMb": 4096, "zone": parts[1],
                "selfLink": self._link(f"zones/{parts[1]}/machineTypes/{parts[3]}"), "description": parts[3],
            }  # fmt: skip
        if parts[0] == "zones" and len(parts) == 4 and parts[2] == "diskTypes":
            return 200, {
                "kind": "compute#diskType", "id": "30003", "name": parts[3], "validDiskSize": "10GB-65536GB",
                "zone": self._link(f"zones/{parts[1]}"), "defaultDiskSizeGb": "10",
                "selfLink": self._link(f"zones/{parts[1]}/diskTypes/{parts[3]}"), "description": parts[3],
            }  # fmt: skip
        if rel == "global/networks/default":
            return 200, {
                "kind": "compute#network", "id": "4000", "name": "default", "autoCreateSubnetworks": True,
                "selfLink": self._link("global/networks/default"), "subnetworks": [],
            }  # fmt: skip
        m = re.fullmatch(r"projects/([^/]+)/global/images/family/([^/]+)", rel)
        if m:
            if (m[1], m[2]) not in IMAGE_FAMILIES:
                return not_found(f"projects/{m[1]}/global/images/family/{m[2]}")
            return 200, {
                "kind": "compute#image", "id": "5000", "name": f"{m[2]}-v20261101", "family": m[2],
                "status": "READY", "selfLink": f"{V1}/projects/{m[1]}/global/images/{m[2]}-v20261101",
                "diskSizeGb": "10",
            }  # fmt: skip
        if parts[0] == "zones" and len(parts) == 3 and parts[2] == "instances":
            if method == "POST":
                return self._insert_instance(parts[1], data)
            return 200, {"kind": "compute#instanceList", "items": list(self.instances.values())}
        if parts[0] == "zones" and len(parts) == 4 and parts[2] == "instances":
            inst = self.instances.get(parts[3])
            if inst is None:
                return not_found(f"{proj}/zones/{parts[1]}/instances/{parts[3]}")
            if method == "DELETE":
                del self.instances[parts[3]]
                self.disks.pop(parts[3], None)
                return 200, self._operation("delete", inst["selfLink"], parts[1])
            return 200, inst
        if parts[0] == "zones" and len(parts) == 4 and parts[2] == "disks":
            disk = self.disks.get(parts[3])
            return (200, disk) if disk else not_found(f"{proj}/zones/{parts[1]}/disks/{parts[3]}")
        if parts[0] == "zones" and len(parts) >= 4 and parts[2] == "operations":
            op = self._poll(parts[3])
            return (200, op) if op else not_found(f"{proj}/zones/{parts[1]}/operations/{parts[3]}")
        if rel == "aggregated/instances" or rel == "aggregated/disks":
            kind = rel.split("/")[1]
            store = self.instances if kind == "instances" else self.disks
            scoped: dict[str, Any] = {f"zones/{z}": {"warning": {"code": "NO_RESULTS_ON_PAGE"}} for z in ZONES}
            for item in store.values():
                scoped[f"zones/{item['zone'].rsplit('/', 1)[-1]}"] = {
                    kind: [i for i in store.values() if i["zone"] == item["zone"]]
                }
            return 200, {"kind": f"compute#{kind}AggregatedList", "items": scoped}
        if rel == "global/firewalls" and method == "POST":
            name = data.get("name", "")
            if name in self.firewalls:
                msg = f"The resource '{proj}/global/firewalls/{name}' already exists"
                return 409, error(409, msg, "alreadyExists", "ALREADY_EXISTS")
            link = self._link(f"global/firewalls/{name}")
            self.firewalls[name] = {**data, "kind": "compute#firewall", "id": str(next(self._ids)), "selfLink": link}
            return 200, self._operation("insert", link, "global")
        if parts[:2] == ["global", "firewalls"] and len(parts) == 3:
            fw = self.firewalls.get(parts[2])
            if fw is None:
                return not_found(f"{proj}/global/firewalls/{parts[2]}")
            if method == "DELETE":
                del self.firewalls[parts[2]]
                return 200, self._operation("delete", fw["selfLink"], "global")
            return 200, fw
        if parts[:2] == ["global", "operations"] and len(parts) >= 3:
            op = self._poll(parts[2])
            if op and len(parts) == 4 and parts[3] == "wait":  # wait: returns when DONE (or after a while)
                op = self._poll(parts[2])
            return (200, op) if op else not_found(f"{proj}/global/operations/{parts[2]}")
        return 404, error(404, f"fake GCE does not serve {method} {rel}", "notFound", "NOT_FOUND")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                status, payload = fake.handle(self.command, self.path, self.headers, body)
                out = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = do_DELETE = do_PATCH = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler
