"""A real Prometheus scrapes real agents while migrations run, with the scrape config docs/observability.md
shows, and every query of docs/grafana-dashboard.json is asked of it (Grafana itself cannot run here).

Debian's `prometheus` (installed by `make host`) runs as our own process in the controller's netns (the
agents listen on their overlay addresses, which only mesh members reach), on 127.0.0.1 at a free port,
with its data in this run's tmp dir; it scrapes every second. Meanwhile, on a two-host mesh joined by an
emulated 16 Mbit/s WAN (so that a churner's pre-copy is throttled, as in test_autoconverge): a stop-copy
rolled back at restore, a post-copy whose lazy phase the `hold-pages` drill holds until Prometheus has
seen its outstanding pages, a churner throttled until Prometheus has seen the throttle and its dirty rate,
and an evacuation of the host. Then Prometheus's HTTP API must show each of them. Outcomes only, never
timings: each wait is for something to happen, with a generous deadline.
"""

import http.client
import json
import math
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import yaml
from kit.mesh import local_mesh
from kit.net import http_get
from kit.wait import eventually
from skyferry.netplane import netns
from skyferry.netplane.mesh import Mesh
from skyferry.netplane.netns import in_netns
from skyferry.pipeline.agent.server import identity_for
from skyferry.pipeline.controller import agentctl, containers, migration
from skyferry.pipeline.controller.journal import Journal
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi.layout import AGENT_PORT
from skyferry.pipeline.hostapi.spec import HOST_PROGRAMS
from skyferry.pipeline.runbooks import evacuate as evacuation
from skyferry.pipeline.scenarios import demo as scenario

pytestmark = [pytest.mark.integration, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]
DOCS = Path(__file__).parents[3] / "docs"
SRC, DST = "local-1", "local-2"
SCRAPE = "1s"
RATE_INTERVAL = "4s"  # Grafana's $__rate_interval for a 1 s scrape interval: 4 scrape intervals


def documented_job() -> dict[str, Any]:
    """The scrape job of docs/observability.md's "Prometheus scrape config", as written there."""
    text = (DOCS / "observability.md").read_text()
    section = text.split("### Prometheus scrape config", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block, "no yaml block under 'Prometheus scrape config'"
    (job,) = yaml.safe_load(block.group(1))["scrape_configs"]
    return job


def config(certs: Path, host_tls: Path, m: Mesh) -> dict[str, Any]:
    """The documented job, pointed at this mesh's agents and this run's monitor certificate, scraping every
    second; and two jobs that must fail: no client certificate, and a host's own certificate."""
    job = documented_job()
    assert job["scheme"] == "https" and job["metrics_path"] == "/v1/metrics", job
    assert set(job["tls_config"]) == {"ca_file", "cert_file", "key_file"}, job
    targets = [{"targets": [f"{h.overlay_ip}:{AGENT_PORT}"], "labels": {"host": n}} for n, h in m.hosts.items()]
    # Only the directory and the addresses change: the file names are the ones issue-monitor-cert writes.
    tls = {key: str(certs / Path(path).name) for key, path in job["tls_config"].items()}
    good = {**job, "scrape_interval": SCRAPE, "tls_config": tls, "static_configs": targets}
    no_cert = {**good, "job_name": "no-client-cert", "tls_config": {"ca_file": tls["ca_file"]}}
    host_cert = {"cert_file": str(host_tls / "cert.pem"), "key_file": str(host_tls / "key.pem")}
    as_host = {**good, "job_name": "host-cert", "tls_config": {"ca_file": tls["ca_file"], **host_cert}}
    return {"scrape_configs": [good, no_cert, as_host]}


class Prometheus:
    """Our own `prometheus` in netns `ns`, its API on 127.0.0.1:`port` there; stopped by its pid only."""

    def __init__(self, ns: str | None, cfg: Path, data: Path) -> None:
        binary = shutil.which("prometheus")
        assert binary, "no prometheus on this machine: `make host` installs it (scripts/bootstrap-host.sh)"
        self.ns, self.port = ns, _free_port(ns)
        self.log = (data.parent / "prometheus.log").open("wb")
        argv = [binary, f"--config.file={cfg}", f"--storage.tsdb.path={data}",
                f"--web.listen-address=127.0.0.1:{self.port}"]  # fmt: skip
        # nsenter execs in place: the pid is prometheus's own.
        self.proc = subprocess.Popen(netns.command(ns, argv), stdout=self.log, stderr=self.log)
        try:
            eventually("prometheus to be ready", self._ready)
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        assert self.proc.poll() is None, f"prometheus exited: {self.proc.returncode}"
        try:
            return self._get("/-/ready")[0] == 200
        except OSError:
            return False

    def _get(self, path: str) -> tuple[int, bytes]:
        return http_get(http.client.HTTPConnection("127.0.0.1", self.port, timeout=30), self.ns, path)

    def api(self, path: str, **params: object) -> Any:
        status, body = self._get(f"/api/v1/{path}?{urlencode({k: v for k, v in params.items() if v is not None})}")
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", (path, params, answer)
        return answer["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        return self.api("query", query=expr, time=at)["result"]

    def value(self, expr: str, at: float | None = None) -> float:
        """The one sample of `expr` (a sum), or 0 when there is none (a counter not yet incremented)."""
        result = self.query(expr, at)
        assert len(result) <= 1, (expr, result)
        return float(result[0]["value"][1]) if result else 0.0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _free_port(ns: str | None) -> int:
    with in_netns(ns):
        s = socket.socket()
    with s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sleeper(state: Path, name: str) -> None:
    args = [scenario.PYTHON, "-c", "import time; time.sleep(900)"]
    info = containers.run(state, SRC, name, args, host_dirs=list(HOST_PROGRAMS))
    assert info["state"] == "running", info


class InThread:
    """`fn()` in a thread: its result or its error."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except Exception as exc:
            self.result = exc

    def wait(self) -> Any:
        self.thread.join(timeout=900)
        assert not self.thread.is_alive(), "still running after 900 s"
        return self.result


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The mesh, Prometheus scraping it, and every migration, run while it scrapes (see the module doc)."""
    work = tmp_path_factory.mktemp("prom")
    with local_mesh(tmp_path_factory, count=2, prefix="pm", wan="rate=16mbit") as (state, m):
        certs = work / "monitor"
        agentctl.issue_monitor(state, m, "prometheus", certs)
        (work / "prometheus.yml").write_text(
            yaml.safe_dump(config(certs, identity_for(Path(m.hosts[DST].state_root)).cert.parent, m))
        )
        prom = Prometheus(m.controller.netns, work / "prometheus.yml", work / "data")
        try:
            yield _migrate_all(state, m, prom, work)
        finally:
            prom.stop()
            for row in containers.live(state):
                containers.remove(state, row["name"])


def _migrate_all(state: Path, m: Mesh, prom: Prometheus, work: Path) -> dict[str, Any]:
    def up() -> bool:
        return {r["metric"]["host"] for r in prom.query('up{job="skyferry"} == 1')} == set(m.hosts)

    eventually("prometheus scrapes every agent", up)
    t0 = time.time()
    ran: list[dict[str, Any]] = []  # every migration: container, mode, outcome, failed stage

    # A stop-copy that fails at restore and is rolled back (the container stays on local-1).
    _sleeper(state, "pm-back")
    faults = Path(m.hosts[DST].state_root) / "faults"
    faults.write_text("restore\n")
    try:
        with pytest.raises(SkyferryError, match="failed at restore"):
            migration.migrate(state, "pm-back", DST, mode="stop-copy")
    finally:
        faults.unlink()
    ran.append({"container": "pm-back", "mode": "stop-copy", "outcome": "rolled-back", "failed_stage": "restore"})

    # A post-copy held in its lazy phase (no page moves); a memory check meanwhile makes the container
    # fault on pages it lacks, which wait for the source once the drill lets go.
    lazy = scenario.start_counter(state, SRC, "pm-lazy", work, memory_mib=16)
    faults.write_text("hold-pages\n")
    try:
        moving = InThread(lambda: migration.migrate(state, "pm-lazy", DST, mode="postcopy"))
        eventually("the lazy phase", lambda: _lazy_started(state, "pm-lazy"))
        checked = InThread(lambda: scenario.check_memory(m.hosts[DST].netns or "", lazy["ip"]))
        eventually(
            "prometheus to see pages outstanding",
            lambda: prom.value('sum(skyferry_lazy_pages_outstanding{container="pm-lazy"})') > 0,
        )
    finally:
        faults.unlink(missing_ok=True)
    report = moving.wait()
    assert isinstance(report, dict) and report["state"] == "done", report
    assert checked.wait()["bad"] == 0
    ran.append({"container": "pm-lazy", "mode": "postcopy", "outcome": "done", "failed_stage": "none"})

    # A churner faster than the link: pre-copy measures its dirty rate and throttles it.
    scenario.start_counter(state, SRC, "pm-churn", work, memory_mib=16, dirty_mb_s=40)
    moving = InThread(lambda: migration.migrate(state, "pm-churn", DST, mode="precopy", completion_timeout=3600))
    for series in ("skyferry_autoconverge_throttle_percent", "skyferry_precopy_dirty_rate_bytes"):
        eventually(f"prometheus to see {series}", lambda s=series: prom.query(f'{s}{{container="pm-churn"}} > 0'))
    report = moving.wait()
    assert isinstance(report, dict) and report["state"] == "done", report
    ran.append({"container": "pm-churn", "mode": "precopy", "outcome": "done", "failed_stage": "none"})

    # The evacuation of local-1: the rolled-back container and one more, two at a time.
    _sleeper(state, "pm-evac")
    summary = evacuation.evacuate(state, SRC, parallel=2)
    assert summary["ok"] and {r["container"] for r in summary["results"]} == {"pm-back", "pm-evac"}, summary
    for r in summary["results"]:
        ran.append({"container": r["container"], "mode": r["mode"], "outcome": "done", "failed_stage": "none"})

    t1 = time.time()

    def scraped_since() -> bool:
        return all(float(r["value"][1]) > t1 for r in prom.query('timestamp(up{job="skyferry"} == 1)')) and up()

    def counted() -> bool:
        sides = ((SRC, "source"), (DST, "target"))
        return all(prom.value(f'sum(skyferry_migrations_total{{host="{h}",side="{s}"}})') == len(ran) for h, s in sides)

    eventually("a scrape of every agent after the last migration", scraped_since)
    # One run in four, the first scrape stamped after the evacuation still held the source's count from
    # before it, while the agent's own /v1/metrics already said all of them (seen 2026-12-04, before and
    # after that day's changes), and once the target's (a full run later that day, under the VM tests'
    # load): wait for Prometheus to hold every migration on both sides; the tests then check each one's
    # labels, the histograms and the dashboards.
    eventually("prometheus to count every migration on both sides", counted)
    return {"state": state, "mesh": m, "prom": prom, "t0": t0, "t1": time.time(), "ran": ran}


def _lazy_started(state: Path, name: str) -> bool:
    mig = Journal(state).active_for(name)
    return mig is not None and Journal(state).stage_status(mig.id).get("lazy") == "started"


def test_prometheus_scrapes_every_agent_with_the_monitor_certificate_and_only_with_it(scraped: dict) -> None:
    prom, m, t1 = scraped["prom"], scraped["mesh"], scraped["t1"]
    run = f"{int(time.time() - scraped['t0']) + 10}s"
    # The documented job reads every agent (the positive control of the two below): `up` as the fixture
    # last waited for it (a scrape of a busy agent may time out now and then; that is not what is tested).
    for host in m.hosts:
        assert prom.value(f'up{{job="skyferry",host="{host}"}}', t1) == 1
        assert prom.value(f'sum(skyferry_agent_info{{job="skyferry",host="{host}"}})', t1) == 1
    # The agent names itself in its exposition too (the dashboard's $host variable lists these).
    hosts = {s.get("host") for s in prom.api("series", **{"match[]": "skyferry_agent_info"})}
    assert hosts == set(m.hosts), hosts
    # Without a client certificate, or with a host's own, no scrape of the whole run succeeded, and no
    # sample of the agents' metrics came through either job.
    for job in ("no-client-cert", "host-cert"):
        for host in m.hosts:
            assert prom.value(f'max_over_time(up{{job="{job}",host="{host}"}}[{run}])') == 0, (job, host)
    assert prom.query(f'count_over_time({{job=~"no-client-cert|host-cert", __name__=~"skyferry_.*"}}[{run}])') == []

    # Why: without a certificate there is no HTTP answer at all ("remote error: tls: certificate required",
    # or "broken pipe" when the agent's refusal, which TLS 1.3 sends after the client's side of the
    # handshake, lands while the request is written); a host's certificate gets 403.
    def refused(job: str, reason: str) -> bool:
        errors = {t["labels"]["host"]: t["lastError"] for t in prom.api("targets", state="active")["activeTargets"]
                  if t["labels"]["job"] == job}  # fmt: skip
        return set(errors) == set(m.hosts) and all(re.search(reason, e) for e in errors.values())

    eventually("scrapes without a client certificate to fail the handshake",
               lambda: refused("no-client-cert", "tls: certificate required|broken pipe|connection reset"))  # fmt: skip
    eventually("scrapes with a host's certificate to get 403", lambda: refused("host-cert", "HTTP status 403"))


def test_the_migrations_counter_shows_each_migration_with_its_mode_and_outcome(scraped: dict) -> None:
    prom, ran, t0, t1 = scraped["prom"], scraped["ran"], scraped["t0"], scraped["t1"]
    expected: dict[tuple[str, str, str], int] = {}
    for r in ran:
        key = (r["mode"], r["outcome"], r["failed_stage"])
        expected[key] = expected.get(key, 0) + 1
    for side, host in (("source", SRC), ("target", DST)):
        seen = {}
        for r in prom.query(f'skyferry_migrations_total{{job="skyferry",host="{host}",side="{side}"}}', t1):
            labels = r["metric"]
            if float(r["value"][1]):
                seen[(labels["mode"], labels["outcome"], labels["failed_stage"])] = float(r["value"][1])
        # The mesh is this module's: nothing was counted before the first migration.
        assert prom.value(f'sum(skyferry_migrations_total{{host="{host}"}})', t0) == 0
        assert seen == {k: float(v) for k, v in expected.items()}, (side, seen, expected)


def test_the_freeze_histogram_counts_every_migration_of_the_source(scraped: dict) -> None:
    prom, ran, t0, t1 = scraped["prom"], scraped["ran"], scraped["t0"], scraped["t1"]
    for outcome in ("done", "rolled-back"):
        expr = f'sum(skyferry_migration_freeze_seconds_count{{job="skyferry",host="{SRC}",outcome="{outcome}"}})'
        grew = prom.value(expr, t1) - prom.value(expr, t0)
        assert grew == sum(r["outcome"] == outcome for r in ran), (outcome, grew, ran)
    # Per mode, too (the dashboard's freeze quantiles are by mode).
    for mode in {r["mode"] for r in ran if r["outcome"] == "done"}:
        expr = f'sum(skyferry_migration_freeze_seconds_count{{host="{SRC}",mode="{mode}",outcome="done"}})'
        assert prom.value(expr, t1) == sum(r["mode"] == mode and r["outcome"] == "done" for r in ran), mode
    # The target records no freeze.
    assert prom.value(f'sum(skyferry_migration_freeze_seconds_count{{host="{DST}"}})', t1) == 0


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel of docs/grafana-dashboard.json."""
    board = json.loads((DOCS / "grafana-dashboard.json").read_text())
    return [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]


def grafana(expr: str, range_s: int) -> str:
    """`expr` as Grafana sends it: $host with every host chosen (the variable's allValue), the range of
    the dashboard's time range, the rate interval of a 1 s scrape."""
    text = expr.replace("$host", ".*").replace("$__range", f"{range_s}s").replace("$__rate_interval", RATE_INTERVAL)
    assert "$" not in text, f"a template variable this test does not know: {expr}"
    return text


def test_every_dashboard_query_parses_and_returns_data_after_the_evacuation(scraped: dict) -> None:
    prom, t0, t1 = scraped["prom"], scraped["t0"], scraped["t1"]
    queries = dashboard_queries()
    assert len(queries) >= 10, queries
    start, end = t0 - 5, t1 + 5
    empty = []
    for title, expr in queries:
        data = prom.api("query_range", query=grafana(expr, int(end - start)), start=start, end=end, step=1)
        values = [float(v) for series in data["result"] for _, v in series["values"]]
        if not any(math.isfinite(v) for v in values):
            empty.append((title, expr))
    assert empty == [], empty
    # The $host variable's query (Grafana's label_values) names every agent.
    board = json.loads((DOCS / "grafana-dashboard.json").read_text())
    (var,) = board["templating"]["list"]
    found = re.fullmatch(r"label_values\((\w+), (\w+)\)", var["query"]["query"])
    assert found, var["query"]
    metric, label = found.groups()
    assert set(prom.api(f"label/{label}/values", **{"match[]": metric})) == set(scraped["mesh"].hosts)


def test_the_dashboards_counts_over_the_run_are_the_migrations_that_ran(scraped: dict) -> None:
    """The range panels at the end of the run, over the whole run: every migration counted once, the first
    of each kind included (a series that appeared only with its first migration would hide that one from
    increase(), which sees only changes)."""
    prom, ran, t0, t1 = scraped["prom"], scraped["ran"], scraped["t0"], scraped["t1"]
    panels = dict(dashboard_queries())
    range_s = int(t1 - t0) + 3

    def counted(title: str, *labels: str) -> dict[tuple[str, ...], int]:
        rows = prom.query(grafana(panels[title], range_s), t1)
        counts = {tuple(r["metric"][x] for x in labels): round(float(r["value"][1])) for r in rows}
        return {k: v for k, v in counts.items() if v}

    ended: dict[tuple[str, ...], int] = {}
    failed: dict[tuple[str, ...], int] = {}
    for r in ran:
        ended[(r["outcome"],)] = ended.get((r["outcome"],), 0) + 1
        if r["outcome"] == "rolled-back":
            failed[(r["failed_stage"], r["mode"])] = failed.get((r["failed_stage"], r["mode"]), 0) + 1
    assert counted("Migrations ended (range)", "outcome") == ended
    assert counted("Failures by stage (range)", "failed_stage", "mode") == failed


def test_a_broken_query_is_refused_by_the_same_prometheus(scraped: dict) -> None:
    """Positive control of the check above: Prometheus's API does refuse what does not parse."""
    status, body = scraped["prom"]._get("/api/v1/query?" + urlencode({"query": "sum by (host (skyferry_containers)"}))
    assert status == 400 and json.loads(body)["errorType"] == "bad_data", body
