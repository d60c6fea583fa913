"""GcpProvider against the stateful GCE fake: the real libcloud GCE driver and google-cloud-compute."""

import json
import re
from pathlib import Path

import pytest
from kit.gce_fake import GceFake, new_service_account
from skyferry.providers.base import WIREGUARD_PORT
from skyferry.providers.errors import ProviderError
from skyferry.providers.gcp import GcpProvider
from skyferry.providers.naming import PLAN_TAG

pytestmark = pytest.mark.integration

# What libcloud's create_node sends per instance, in order (after the one-off checks before it).
CREATE = [
    "GET global/networks/default",
    "GET projects/debian-cloud/global/images/family/debian-12",
    "GET zones/us-central1-a/diskTypes/pd-standard",
    "POST zones/us-central1-a/instances",
    "GET zones/us-central1-a/operations/*",
    "GET zones/us-central1-a/operations/*",
    "GET zones/us-central1-a/instances/{name}",
    "GET aggregated/disks",
]


def _shape(call: str) -> str:
    """Operation names are random: 'GET …/operations/operation-123-ab' -> 'GET …/operations/*'."""
    return re.sub(r"/operations/operation-[^/]+(/wait)?$", r"/operations/*\1", call)


def test_full_gce_cycle(gce: GceFake, plan: str) -> None:
    gcp = GcpProvider()
    assert gce.calls()[0] == "POST /o/oauth2/token"  # libcloud signs in with the service account
    start = len(gce.requests)
    hosts = gcp.provision(plan, 2, size="e2-small", user_data=lambda n: f"#cloud-config\nhostname: {n}\n")
    calls = [_shape(c) for c in gce.calls(start)]

    # google-cloud-compute makes the firewall and waits on the global operation itself.
    fw = calls.index(f"GET global/firewalls/skyferry-{plan}-wg")
    assert calls[fw + 1 : fw + 3] == ["POST global/firewalls", "POST global/operations/*/wait"]
    at = fw
    for i in range(2):
        expected = [c.format(name=f"{plan}-{i}") for c in CREATE]
        at = calls.index("POST zones/us-central1-a/instances", at) - 3
        assert calls[at : at + len(expected)] == expected
        at += len(expected)

    assert sorted(h.name for h in hosts) == [f"{plan}-0", f"{plan}-1"]
    assert all(h.tags[PLAN_TAG] == plan and h.address and h.state == "running" for h in hosts)
    inst = gce.instances[f"{plan}-1"]
    assert inst["labels"] == {PLAN_TAG: plan, "skyferry-host": f"{plan}-1"}
    assert inst["tags"]["items"] == [f"skyferry-{plan}"]
    meta = {i["key"]: i["value"] for i in inst["metadata"]["items"]}
    assert meta["user-data"] == f"#cloud-config\nhostname: {plan}-1\n"
    rule = gce.firewalls[f"skyferry-{plan}-wg"]
    assert rule["allowed"] == [{"IPProtocol": "udp", "ports": [str(WIREGUARD_PORT)]}]
    assert rule["targetTags"] == [f"skyferry-{plan}"] and rule["sourceRanges"] == ["0.0.0.0/0"]

    assert gcp.wait_ready(hosts, timeout=30)
    # Idempotent: nothing new is created the second time.
    start = len(gce.requests)
    again = gcp.provision(plan, 2, size="e2-small")
    assert {h.id for h in again} == {h.id for h in hosts}
    assert not any(c.startswith("POST") for c in gce.calls(start))
    gcp.open_wireguard_port(plan)

    removed = gcp.destroy(plan)
    assert set(removed) == {h.id for h in hosts} | {f"skyferry-{plan}-wg"}
    assert gcp.list(plan) == [] and gce.instances == {} and gce.firewalls == {}
    assert gcp.destroy(plan) == []


def test_quota_error_cleans_up(gce: GceFake, plan: str) -> None:
    gce.cpu_quota = 4  # room for two e2-small (2 vCPUs each), not three
    gcp = GcpProvider()
    with pytest.raises(ProviderError, match=r"GCE quota reached.*Quota 'CPUS' exceeded") as exc:
        gcp.provision(plan, 3, size="e2-small")
    assert "nothing was left behind" in (exc.value.hint or "")
    assert gcp.list(plan) == [] and gce.instances == {} and gce.firewalls == {}
    assert any("DELETE zones/us-central1-a/instances" in c for c in gce.calls())


def test_unknown_zone(gce: GceFake) -> None:
    with pytest.raises(ProviderError, match="unknown GCE zone 'mars-north1-a'"):
        GcpProvider(zone="mars-north1-a")
    assert gce.instances == {}


def test_unknown_size(gce: GceFake, plan: str) -> None:
    with pytest.raises(ProviderError, match="unknown GCE machine type 'e2-humongous'"):
        GcpProvider().provision(plan, 1, size="e2-humongous")
    assert gce.instances == {} and gce.firewalls == {}


def test_missing_credentials(gce: GceFake, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS")
    with pytest.raises(ProviderError, match="no GCP credentials") as exc:
        GcpProvider()
    assert "GOOGLE_APPLICATION_CREDENTIALS" in (exc.value.hint or "")


def test_untrusted_key_is_refused_and_never_echoed(gce: GceFake, tmp_path: Path, monkeypatch) -> None:
    info, _ = new_service_account(gce.project, token_uri=f"{gce.url}/token")  # a key GCE does not know
    key_file = tmp_path / "other.json"
    key_file.write_text(json.dumps(info))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
    with pytest.raises(ProviderError, match="GCE refused the credentials") as exc:
        GcpProvider()
    assert "PRIVATE KEY" not in str(exc.value) and info["private_key_id"] not in str(exc.value)
    assert gce.instances == {}


def test_rate_limit_is_retried(gce: GceFake, plan: str) -> None:
    gcp = GcpProvider()
    msg = "Rate Limit Exceeded"
    gce.fail_next("POST zones/us-central1-a/instances", 403, "rateLimitExceeded", msg, times=2)
    gce.fail_next("GET zones/us-central1-a/instances", 429, "rateLimitExceeded", msg)
    hosts = gcp.provision(plan, 1, size="e2-small")
    assert [h.name for h in hosts] == [f"{plan}-0"] and gce.faults == []
    assert sum(c == "POST zones/us-central1-a/instances" for c in gce.calls()) == 3
    gcp.destroy(plan)
