"""What an operator on call sees of migrations: each agent's Prometheus metrics, who may read them, and the
JSON log lines of the agents and the CLI (docs/observability.md).

Real agents on a real two-host local mesh, started with SKYFERRY_LOG_FORMAT=json; migrations run through
the `skyferry` CLI with `--log-format json`, so the CLI's own lines are checked as well.
"""

import base64
import http.client
import json
import logging
import os
import re
import secrets
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kit.machine import machine_on_underlay, run_in
from kit.mesh import local_mesh
from kit.net import http_get
from prometheus_client.parser import text_string_to_metric_families
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline import logfmt
from skyferry.pipeline.agent.join import Layout, join
from skyferry.pipeline.agent.server import identity_for
from skyferry.pipeline.controller import agentctl, containers, enrol, tokens
from skyferry.pipeline.controller.stages import PRECOPY
from skyferry.pipeline.hostapi import pki
from skyferry.pipeline.hostapi.layout import AGENT_PORT
from skyferry.pipeline.hostapi.spec import HOST_PROGRAMS
from skyferry.pipeline.scenarios import demo as scenario

pytestmark = [pytest.mark.integration, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]
SKYFERRY = str(Path(sys.executable).parent / "skyferry")
SECRET_ENV = "SKYFERRY_TEST_SECRET"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Mesh]]:
    """Two hosts whose agents log JSON (they inherit the variable from this process)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SKYFERRY_LOG_FORMAT", "json")
        with local_mesh(tmp_path_factory, count=2, prefix="o") as made:
            yield made


def _get(m: Mesh, host: str, ctx: ssl.SSLContext, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPSConnection(m.hosts[host].overlay_ip, AGENT_PORT, context=ctx, timeout=30)
    return http_get(conn, m.controller.netns, path)


def _metrics(state: Path, m: Mesh, host: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of `host`'s exposition, through the client the CLI uses: {(name, labels): value}."""
    text = agentctl.client(state, m, host).call("GET", "/v1/metrics").decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects among `text`'s lines (an agent's log also holds what its tools printed)."""
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def _agent_log(m: Mesh, host: str) -> str:
    return (Path(m.hosts[host].state_root) / "agent.log").read_text(errors="replace")


def _holds(text: str, secret: str) -> bool:
    """Whether `text` holds `secret`, as written or as JSON would escape it."""
    return secret in text or json.dumps(secret)[1:-1] in text


def _start(state: Path, name: str, env: dict[str, str] | None = None) -> None:
    args = [scenario.PYTHON, "-c", "import time; time.sleep(600)"]
    info = containers.run(state, "local-1", name, args, env=env, host_dirs=list(HOST_PROGRAMS))
    assert info["state"] == "running", info


def _migrate(name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SKYFERRY, "--log-format", "json", "migrate", name, "--to", "local-2", "--json", *extra],
        capture_output=True, text=True, env=os.environ.copy(), check=False,
    )  # fmt: skip


def test_a_migration_shows_in_both_agents_metrics_and_every_stage_logs_its_id(mesh: tuple[Path, Mesh]) -> None:
    state, m = mesh
    name = f"obs-{secrets.token_hex(3)}"
    secret = f"s3cret-{secrets.token_hex(12)}"
    _start(state, name, env={SECRET_ENV: secret})
    try:
        # The secret really is in the container (what a leak would leak).
        seen = containers.exec_(state, name, ["/bin/sh", "-c", f"echo ${SECRET_ENV}"])
        assert secret.encode() in base64.b64decode(seen.stdout), seen
        before = {h: _metrics(state, m, h) for h in ("local-1", "local-2")}
        proc = _migrate(name)
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["state"] == "done" and report["mode"] == "precopy", report
        after = {h: _metrics(state, m, h) for h in ("local-1", "local-2")}

        # Both agents count it, each as its side, with the mode and the outcome.
        for host, side in (("local-1", "source"), ("local-2", "target")):
            key = {"side": side, "mode": "precopy", "outcome": "done", "failed_stage": "none"}
            grew = _value(after[host], "skyferry_migrations_total", **key) - _value(
                before[host], "skyferry_migrations_total", **key
            )
            assert grew == 1, (host, key)
            assert _value(after[host], "skyferry_migration_bytes_total", side=side, stream="precopy-round") > _value(
                before[host], "skyferry_migration_bytes_total", side=side, stream="precopy-round"
            )
        # The source's freeze histogram counts it, with the controller's measured freeze in its sum.
        freeze = {"mode": "precopy", "outcome": "done"}
        src0, src1 = before["local-1"], after["local-1"]
        assert (
            _value(src1, "skyferry_migration_freeze_seconds_count", **freeze)
            - _value(src0, "skyferry_migration_freeze_seconds_count", **freeze)
            == 1
        )
        added = _value(src1, "skyferry_migration_freeze_seconds_sum", **freeze) - _value(
            src0, "skyferry_migration_freeze_seconds_sum", **freeze
        )
        assert added == pytest.approx(report["freeze_ms"] / 1000, abs=0.002)
        assert (
            _value(src1, "skyferry_precopy_rounds_total", method="content")
            + _value(src1, "skyferry_precopy_rounds_total", method="soft-dirty")
            >= 1
        )
        assert _value(after["local-2"], "skyferry_containers") >= 1
        assert _value(after["local-2"], "skyferry_container_memory_bytes", container=name) > 0

        # Every stage has a JSON line of the CLI's with the migration's id; every agent step one of its
        # agent's, with the host too.
        cli_lines = [x for x in _json_lines(proc.stderr) if x.get("migration") == report["id"]]
        assert {x["stage"] for x in cli_lines} >= {s.name for s in PRECOPY}, cli_lines
        assert all(x["container"] == name for x in cli_lines)
        steps = {
            "local-1": {"precopy", "checkpoint", "transfer", "confirm"},
            "local-2": {"prepare", "restore", "cleanup"},
        }
        for host, wanted in steps.items():
            mine = [x for x in _json_lines(_agent_log(m, host)) if x.get("migration") == report["id"]]
            assert {x["stage"] for x in mine} >= wanted, (host, mine)
            assert {x["host"] for x in mine} == {host}

        # No log line anywhere holds the container's secret environment value.
        for where, text in [("cli", proc.stderr)] + [(h, _agent_log(m, h)) for h in m.hosts]:
            assert not _holds(text, secret), f"the secret is in the {where} log"
    finally:
        containers.remove(state, name)


def test_the_secret_scanner_finds_a_secret_that_was_logged() -> None:
    """Positive control of the scan above: a JSON line that logs the secret (escaped or not) is found."""
    secret = f's3cret-"{secrets.token_hex(8)}'
    formatter = logfmt.JsonFormatter({"host": "local-1"})
    record = logging.LogRecord("skyferry.test", logging.INFO, __file__, 1, "env %s", ({SECRET_ENV: secret},), None)
    line = formatter.format(record)
    assert _holds(line, secret)
    assert not _holds(line.replace(json.dumps(secret)[1:-1], "x"), secret)


def test_a_rolled_back_migration_is_counted_with_its_failed_stage(mesh: tuple[Path, Mesh]) -> None:
    state, m = mesh
    name = f"obr-{secrets.token_hex(3)}"
    _start(state, name)
    faults = Path(m.hosts["local-2"].state_root) / "faults"
    try:
        before = {h: _metrics(state, m, h) for h in ("local-1", "local-2")}
        faults.write_text("restore\n")
        try:
            proc = _migrate(name, "--mode", "stop-copy")
        finally:
            faults.unlink()
        assert proc.returncode == 2 and "failed at restore" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
        after = {h: _metrics(state, m, h) for h in ("local-1", "local-2")}
        key = {"mode": "stop-copy", "outcome": "rolled-back", "failed_stage": "restore"}
        for host, side in (("local-1", "source"), ("local-2", "target")):
            grew = _value(after[host], "skyferry_migrations_total", side=side, **key) - _value(
                before[host], "skyferry_migrations_total", side=side, **key
            )
            assert grew == 1, (host, side)
        # The source was frozen until its rollback thawed it: that freeze is counted as rolled back.
        frozen = {"mode": "stop-copy", "outcome": "rolled-back"}
        assert (
            _value(after["local-1"], "skyferry_migration_freeze_seconds_count", **frozen)
            - _value(before["local-1"], "skyferry_migration_freeze_seconds_count", **frozen)
            == 1
        )
    finally:
        containers.remove(state, name)


def test_a_postcopy_migration_counts_the_pages_its_target_fetched(mesh: tuple[Path, Mesh]) -> None:
    state, m = mesh
    name = f"obp-{secrets.token_hex(3)}"
    _start(state, name)
    try:
        before = _metrics(state, m, "local-2")
        proc = _migrate(name, "--mode", "postcopy")
        assert proc.returncode == 0, proc.stderr
        after = _metrics(state, m, "local-2")
        key = {"side": "target", "mode": "postcopy", "outcome": "done", "failed_stage": "none"}
        assert (
            _value(after, "skyferry_migrations_total", **key) - _value(before, "skyferry_migrations_total", **key) == 1
        )
        # Every page of a post-copy comes from the source after the restore (a Python process: hundreds).
        fetched = {"side": "target", "stream": "lazy-pages"}
        grew = _value(after, "skyferry_migration_bytes_total", **fetched) - _value(
            before, "skyferry_migration_bytes_total", **fetched
        )
        assert grew >= 100 * 4096, grew
        # The lazy phase is over: nothing outstanding is left behind for the container.
        assert ("skyferry_lazy_pages_outstanding", frozenset({("container", name)})) not in after
    finally:
        containers.remove(state, name)


def test_a_monitor_certificate_reads_metrics_and_nothing_else(mesh: tuple[Path, Mesh], tmp_path: Path) -> None:
    state, m = mesh
    monitor = agentctl.issue_monitor(state, m, "prometheus", tmp_path / "monitor").client_context()
    controller = agentctl.controller_identity(state, m).client_context()
    host = identity_for(Path(m.hosts["local-2"].state_root)).client_context()
    # The monitor and the controller read the exposition (positive controls).
    for ctx in (monitor, controller):
        status, body = _get(m, "local-1", ctx, "/v1/metrics")
        assert status == 200 and b"skyferry_migrations_running" in body, body[:200]
    # A monitor reads nothing else, and may change nothing.
    for path in ("/v1/facts", "/v1/containers", "/v1/doctor", "/v1/capacity"):
        status, body = _get(m, "local-1", monitor, path)
        assert status == 403 and json.loads(body)["error"], (path, body)
    status, _ = _get(m, "local-1", controller, "/v1/facts")
    assert status == 200  # the same route answers the controller
    # Another host's certificate may not read a host's metrics.
    status, body = _get(m, "local-1", host, "/v1/metrics")
    assert status == 403 and b"may not call it" in body, body
    # The monitor's key stays private.
    assert (tmp_path / "monitor" / "key.pem").stat().st_mode & 0o077 == 0


@pytest.fixture
def captured(tmp_path: Path) -> Iterator[Path]:
    """This process's log lines (the enrolment service runs here) as JSON, in a file, while the test runs."""
    path = tmp_path / "controller.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logfmt.JsonFormatter({}))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def test_a_join_logs_neither_its_token_nor_the_machines_keys(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, captured: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real join with a one-time token, as test_enrol runs it: the enrolment service's lines and the
    agent's that learns the new peer hold no token and no private key of the machine."""
    monkeypatch.setenv("SKYFERRY_LOG_FORMAT", "json")
    with (
        local_mesh(tmp_path_factory, count=1, prefix="oj") as (state, m),
        machine_on_underlay(m, "198.18.0.201", "jo") as machine,
    ):
        layout = Layout(tmp_path / "host", tmp_path / "wg" / "skyferry.conf", tmp_path / "skyferry-agent.service")
        pin = pki.pin(pki.ensure_ca(state / "ca", m.name).read_bytes())
        token = tokens.issue(state, "edge-9", "manual")
        with enrol.serving(state) as service:
            run_in(machine, join, enrol.url(m), token, pin, "edge-9", start=False, layout=layout)
            assert set(service.joined) == {"edge-9"}
        agent_log = _agent_log(m, "local-1")
    logged = captured.read_text()
    # Control: the capture holds the service's own lines about this join, and the agent's about the peer.
    assert any("edge-9 joined" in x["message"] for x in _json_lines(logged)), logged[-2000:]
    assert "/v1/mesh/peers" in agent_log
    # The PEM's first body line is the same for every P-256 key (ASN.1 headers): the others are the key.
    keys = [(layout.state_root / "wireguard" / "private.key").read_text().strip()]
    keys += (layout.state_root / "tls" / "key.pem").read_text().splitlines()[2:-1]
    for secret in [token, token.split(".", 1)[1], *keys]:
        for where, text in (("controller", logged), ("local-1 agent", agent_log)):
            assert not _holds(text, secret), f"a secret of the join is in the {where} log"


def test_the_dashboard_and_the_docs_name_only_metrics_the_agents_expose(mesh: tuple[Path, Mesh]) -> None:
    state, m = mesh
    exposed: set[str] = set()
    for host in m.hosts:
        text = agentctl.client(state, m, host).call("GET", "/v1/metrics").decode()
        for family in text_string_to_metric_families(text):
            exposed |= {family.name, f"{family.name}_total"} | {s.name for s in family.samples}
            exposed |= {f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count")}
    # `skyferry metrics HOST --json`: the same families, as data.
    proc = subprocess.run([SKYFERRY, "metrics", "local-1", "--json"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    families = {f["name"]: f for f in json.loads(proc.stdout)}
    assert families["skyferry_migrations_running"]["type"] == "gauge"
    assert {s["labels"]["side"] for s in families["skyferry_migrations_running"]["samples"]} == {"source", "target"}
    docs = Path(__file__).parents[3] / "docs"
    for doc in ("grafana-dashboard.json", "observability.md"):
        named = set(re.findall(r"\bskyferry_[a-z_]+[a-z]", (docs / doc).read_text()))
        assert named, doc
        assert named <= exposed, (doc, sorted(named - exposed))


def test_a_monitor_certificate_can_be_revoked_and_reissued(mesh: tuple[Path, Mesh], tmp_path: Path) -> None:
    state, m = mesh
    out = tmp_path / "monitor"
    old = agentctl.issue_monitor(state, m, "prom-r", out).client_context()
    assert _get(m, "local-1", old, "/v1/metrics")[0] == 200  # control: the same certificate before
    proc = subprocess.run(
        [SKYFERRY, "mesh", "issue-monitor-cert", "--out", str(out), "--name", "prom-r", "--revoke-old", "--json"],
        capture_output=True, text=True, env=os.environ.copy(), check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert len(answer["revoked"]) == 1 and answer["not_told"] == [], answer
    with pytest.raises((ssl.SSLError, OSError, http.client.HTTPException)):
        _get(m, "local-1", old, "/v1/metrics")
    new = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=answer["ca_file"])
    new.load_cert_chain(answer["cert_file"], answer["key_file"])
    assert _get(m, "local-1", new, "/v1/metrics")[0] == 200
