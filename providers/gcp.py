"""GCP: libcloud's GCE driver for nodes; google-cloud-compute for firewall rules and operation waits.

Instances carry the label skyferry-plan=<plan> and the network tag skyferry-<plan>; the firewall rule
skyferry-<plan>-wg opens WireGuard's UDP port to that tag. Credentials are a service-account JSON
(GOOGLE_APPLICATION_CREDENTIALS or --credentials); both clients sign their own token requests with it.
"""

from __future__ import annotations  # the method named `list` shadows the builtin in annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.cloud import compute_v1
from google.oauth2 import service_account
from libcloud.common.google import GoogleBaseError, QuotaExceededError, ResourceExistsError, ResourceNotFoundError
from libcloud.compute.drivers.gce import GCEConnection, GCENodeDriver
from libcloud.compute.types import NodeState

from .base import WIREGUARD_PORT, Host
from .errors import ProviderError
from .naming import HOST_TAG, PLAN_TAG, UserData, check_plan, missing_names, user_data_for
from .retry import is_transient, transient

DEFAULT_ZONE = "us-central1-a"
DEFAULT_SIZE = "e2-medium"
DEFAULT_IMAGE = "https://www.googleapis.com/compute/v1/projects/debian-cloud/global/images/family/debian-12"
SCOPES = ["https://www.googleapis.com/auth/compute"]
_CRED_HINT = "set GOOGLE_APPLICATION_CREDENTIALS to a service-account JSON key file (or pass --credentials)"


def translate(exc: Exception, what: str) -> ProviderError:
    """A GCE failure as one line an operator can act on. Key material never appears in the message."""
    if isinstance(exc, ProviderError):
        return exc
    text = str(getattr(exc, "value", None) or exc).strip() or type(exc).__name__
    code = getattr(exc, "code", None)
    if isinstance(exc, QuotaExceededError) or code == "QUOTA_EXCEEDED" or "Quota '" in text:
        return ProviderError(
            f"GCE quota reached while {what}: {text}",
            hint="ask for a quota increase in the console, or use a smaller --count or --size; nothing was left behind",
        )
    status = getattr(exc, "http_code", None) or code
    if code in ("rateLimitExceeded", "userRateLimitExceeded"):
        return ProviderError(f"GCE kept rate-limiting while {what}: {text}", hint="try again in a minute")
    if status in (401, 403) or isinstance(exc, gexc.Unauthorized | gexc.Forbidden) or "invalid_grant" in text:
        return ProviderError(f"GCE refused the credentials while {what}: {text}", hint=_CRED_HINT)
    if isinstance(exc, ResourceNotFoundError | gexc.NotFound):
        return ProviderError(f"GCE resource not found while {what}: {text}")
    return ProviderError(f"GCE request failed while {what}: {text}")


def _driver_class(endpoint: str | None) -> type[GCENodeDriver]:
    """libcloud's driver, pointed at `endpoint` (its constructor has no host argument: subclass the
    connection, which also carries the OAuth token request to the same host)."""
    if not endpoint:
        return GCENodeDriver
    url = urlsplit(endpoint)

    class EndpointConnection(GCEConnection):
        def __init__(self, user_id: str, key: str, secure: bool, **kwargs: Any) -> None:
            kwargs.update(host=url.hostname, port=url.port or (443 if url.scheme == "https" else 80))
            super().__init__(user_id, key, url.scheme == "https", **kwargs)

    return type("EndpointGCENodeDriver", (GCENodeDriver,), {"connectionCls": EndpointConnection})


class GcpProvider:
    """Hosts on GCE. `endpoint_url` (or SKYFERRY_GCE_ENDPOINT_URL) points both clients at a local API."""

    name = "gcp"

    def __init__(
        self,
        zone: str | None = None,
        project: str | None = None,
        credentials: Path | None = None,
        endpoint_url: str | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        self.zone = zone or os.environ.get("SKYFERRY_GCP_ZONE") or DEFAULT_ZONE
        self.endpoint_url = endpoint_url or os.environ.get("SKYFERRY_GCE_ENDPOINT_URL") or None
        path = credentials or os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
        if not path:
            raise ProviderError("no GCP credentials found", hint=_CRED_HINT)
        try:
            info = json.loads(Path(path).read_text())
            email = info["client_email"]
            self._creds = service_account.Credentials.from_service_account_info(info, scopes=SCOPES)
        except (OSError, ValueError, KeyError) as exc:
            reason = type(exc).__name__ if isinstance(exc, KeyError | ValueError) else exc.strerror
            raise ProviderError(f"unusable service-account file {path}: {reason}", hint=_CRED_HINT) from None
        self.project = (
            project or os.environ.get("SKYFERRY_GCP_PROJECT") or os.environ.get("GOOGLE_CLOUD_PROJECT")
            or info.get("project_id")
        )  # fmt: skip
        if not self.project:
            raise ProviderError("no GCP project", hint="set SKYFERRY_GCP_PROJECT or use a key with project_id")
        cache = cache_dir or Path.home() / ".cache" / "skyferry"
        cache.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self.driver = _driver_class(self.endpoint_url)(
                email, str(path), project=self.project, auth_type="SA", datacenter=self.zone,
                credential_file=str(cache / f"gce-token.{self.project}.{email}"),
            )  # fmt: skip
        except GoogleBaseError as exc:
            if exc.http_code in (400, 401, 403):  # the token request: a key GCE does not accept
                raise ProviderError(f"GCE refused the credentials of {email}: {exc.value}", hint=_CRED_HINT) from None
            raise translate(exc, f"connecting to project {self.project}") from None
        except Exception as exc:
            raise translate(exc, f"connecting to project {self.project}") from None
        self.driver.connection.poll_interval = 0.5  # libcloud's 2 s default doubles a short operation
        if self.driver.zone is None:
            raise ProviderError(
                f"unknown GCE zone {self.zone!r}",
                hint=f"zones: {', '.join(sorted(self.driver.zone_dict)[:8])}…",
            )
        opts = ClientOptions(api_endpoint=self.endpoint_url) if self.endpoint_url else None
        kw: dict[str, Any] = {"credentials": self._creds, "client_options": opts, "transport": "rest"}
        self.firewalls = compute_v1.FirewallsClient(**kw)
        self.global_ops = compute_v1.GlobalOperationsClient(**kw)

    # --- the Provider protocol -------------------------------------------------------------------------

    def provision(
        self,
        plan: str,
        count: int,
        size: str | None = None,
        region: str | None = None,
        image: str | None = None,
        user_data: UserData = None,
    ) -> list[Host]:
        check_plan(plan)
        if region and region != self.zone:
            raise ProviderError(
                f"this GCP provider is bound to zone {self.zone}, not {region}", hint="pass --region once"
            )
        size = size or DEFAULT_SIZE
        try:
            node_size = self.driver.ex_get_size(size, self.zone)
        except ResourceNotFoundError:
            raise ProviderError(
                f"unknown GCE machine type {size!r} in {self.zone}", hint="use a type such as e2-medium"
            ) from None
        except Exception as exc:
            raise translate(exc, "checking the machine type") from None
        alive = self.list(plan)
        names = missing_names(plan, [h.name for h in alive], count)
        if not names:
            return alive
        made: dict[str, Any] = {"nodes": [], "firewall": False, "before": {h.name for h in alive}}
        try:
            made["firewall"] = self._ensure_firewall(plan, WIREGUARD_PORT)
            for name in names:
                metadata = {"user-data": user_data_for(user_data, name)} if user_data else None
                node = transient(self._create)(
                    name, node_size, image or DEFAULT_IMAGE, location=self.zone,
                    ex_metadata=metadata, ex_tags=[f"skyferry-{plan}"],
                    ex_labels={PLAN_TAG: plan, HOST_TAG: name},
                )  # fmt: skip
                made["nodes"].append(node)
        except Exception as exc:
            err = translate(exc, f"provisioning plan {plan!r}")
            self._undo(plan, made)
            raise err from None
        return self.list(plan)

    def list(self, plan: str | None = None) -> list[Host]:
        try:
            nodes = transient(self.driver.list_nodes)(ex_zone=self.zone)
        except Exception as exc:
            raise translate(exc, "listing instances") from None
        hosts = [self._host(n) for n in nodes if (n.extra.get("labels") or {}).get(PLAN_TAG)]
        return sorted((h for h in hosts if plan is None or h.plan == plan), key=lambda h: h.name)

    def wait_ready(self, hosts: list[Host], timeout: float = 600.0) -> list[Host]:
        wanted = {h.id for h in hosts}
        deadline = time.monotonic() + timeout
        while True:
            now = [h for h in self.list() if h.id in wanted]
            if len(now) == len(wanted) and all(h.state == "running" and h.address for h in now):
                return now
            if time.monotonic() > deadline:
                raise ProviderError(f"GCE hosts not ready after {timeout:.0f}s")
            time.sleep(2)

    def destroy(self, plan: str) -> list[str]:
        check_plan(plan)
        removed: list[str] = []
        try:
            for h in self.list(plan):
                node = self.driver.ex_get_node(h.name, self.zone)
                transient(self.driver.destroy_node)(node)  # waits for the DELETE operation
                removed.append(h.id)
            if self._delete_firewall(plan):
                removed.append(_firewall_name(plan))
        except Exception as exc:
            raise translate(exc, f"destroying plan {plan!r}") from None
        return removed

    def open_wireguard_port(self, plan: str, port: int = WIREGUARD_PORT) -> None:
        check_plan(plan)
        try:
            self._ensure_firewall(plan, port)
        except Exception as exc:
            raise translate(exc, f"opening UDP {port} for plan {plan!r}") from None

    # --- helpers -----------------------------------------------------------------------------------------

    def _host(self, node: Any) -> Host:
        labels = node.extra.get("labels") or {}
        state = {NodeState.RUNNING: "running", NodeState.TERMINATED: "terminated"}.get(node.state, "pending")
        return Host(
            name=node.name,
            provider=self.name,
            plan=labels.get(PLAN_TAG, ""),
            id=str(node.id),
            address=(node.public_ips or [None])[0],
            private_address=(node.private_ips or [None])[0],
            state=state,
            region=self.zone,
            size=node.size,
            tags=dict(labels),
        )

    def _create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """create_node, where a retry that meets the instance made by the try before it takes that one."""
        try:
            return self.driver.create_node(name, *args, **kwargs)
        except ResourceExistsError:
            return self.driver.ex_get_node(name, self.zone)

    def _wait(self, operation: Any) -> None:
        """google-cloud-compute's op.result() polls the public host whatever client_options say: wait
        through GlobalOperationsClient, which honours the endpoint."""
        name = operation.name
        while True:
            op = transient(self.global_ops.wait)(project=self.project, operation=name)
            if op.status == compute_v1.Operation.Status.DONE:
                if op.error and op.error.errors:
                    first = op.error.errors[0]
                    raise GoogleBaseError(first.message, op.http_error_status_code, first.code)
                return

    def _ensure_firewall(self, plan: str, port: int) -> bool:
        """Create the rule unless it exists; True when this call created it."""
        name = _firewall_name(plan)
        with contextlib.suppress(gexc.NotFound):
            transient(self.firewalls.get, when=_retry_google)(project=self.project, firewall=name)
            return False
        rule = compute_v1.Firewall(
            name=name,
            network="global/networks/default",
            direction="INGRESS",
            description=f"skyferry plan {plan}: WireGuard",
            allowed=[compute_v1.Allowed(I_p_protocol="udp", ports=[str(port)])],
            source_ranges=["0.0.0.0/0"],
            target_tags=[f"skyferry-{plan}"],
        )
        try:
            self._wait(self.firewalls.insert(project=self.project, firewall_resource=rule))
        except gexc.Conflict:
            return False  # made by a concurrent run
        return True

    def _delete_firewall(self, plan: str) -> bool:
        try:
            self._wait(self.firewalls.delete(project=self.project, firewall=_firewall_name(plan)))
        except gexc.NotFound:
            return False
        return True

    def _undo(self, plan: str, made: dict[str, Any]) -> None:
        """Remove what a failed provision created; best effort, the original error is what is reported.
        A create whose operation failed may still have left an instance, so look by label too."""
        names = {n.name for n in made["nodes"]}
        with contextlib.suppress(Exception):
            names |= {h.name for h in self.list(plan)} - made["before"]
        for name in sorted(names):
            with contextlib.suppress(Exception):
                self.driver.destroy_node(self.driver.ex_get_node(name, self.zone))
        if made["firewall"]:
            with contextlib.suppress(Exception):
                self._delete_firewall(plan)


def _firewall_name(plan: str) -> str:
    return f"skyferry-{plan}-wg"


def _retry_google(exc: BaseException) -> bool:
    return isinstance(exc, gexc.TooManyRequests | gexc.ServiceUnavailable) or is_transient(exc)
