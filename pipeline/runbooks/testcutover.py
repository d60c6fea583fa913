"""Test cutover: restore a clone on the target where nothing can reach it, check it, discard it.

The "test launch" of cloud migration services. The source container keeps running throughout: it is
paused only while CRIU dumps it (leave-running), and neither routes, nor the registry, nor the journal
change. The clone lives in its own netns on the target (pipeline/agent/clone.py) and is removed whatever
happens, so a failed test leaves the target as clean as a passed one.
"""

import contextlib
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import agentctl
from skyferry.pipeline.controller.registry import Registry
from skyferry.pipeline.controller.report_html import Section
from skyferry.pipeline.controller.stages import Check, Context
from skyferry.pipeline.controller.timeline import Span
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi.layout import AGENT_PORT
from skyferry.pipeline.hostapi.spec import clone_name

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def run(
    state: Path, name: str, target: str, check: str | None = None, timeout: float | None = None,
    progress: Progress = _quiet,
) -> dict[str, Any]:  # fmt: skip
    """Test-cut `name` over to `target`; returns the report ("passed" says whether the clone was healthy).

    Raises SkyferryError only for bad input (unknown container or host, the target is the source);
    a failing step is reported, with the clone discarded.
    """
    mesh = Mesh.load(state)
    entry = Registry(state).get(name)
    mesh.host(target)
    if target == entry.host:
        raise SkyferryError(f"container {name!r} runs on {target}", hint="test against another --to host")
    test_id = time.strftime("t%Y%m%d-%H%M%S-") + secrets.token_hex(2)
    src = agentctl.client(state, mesh, entry.host)
    dst = agentctl.client(state, mesh, target)
    clone = clone_name(name)
    spec = {**entry.spec.to_dict(), "name": clone}
    report: dict[str, Any] = {"id": test_id, "container": name, "source": entry.host, "target": target,
                              "check": check, "steps": {}, "passed": False, "error": None}  # fmt: skip

    def step(label: str, fn: Callable[[], Any]) -> Any:
        progress(label)
        t0 = time.monotonic()
        out = fn()
        report["steps"][label] = round(time.monotonic() - t0, 4)
        return out

    def op(agent: Any, what: str, **body: Any) -> Any:
        return agent.call("POST", f"/v1/migrations/{test_id}/{what}", body)

    before = src.call("GET", f"/v1/containers/{name}")
    report["source_pid"] = before.get("pid")
    ctx = Context(mig_id=test_id, entry=entry, source=entry.host, target=target, mesh=mesh, state=state,
                  src=src, dst=dst, push=agentctl.Pusher(state, mesh, {entry.host: src, target: dst}))  # fmt: skip
    try:
        step("check", lambda: Check().run(ctx))
        step("discard-leftovers", lambda: op(dst, "clone-discard", name=clone, clone=clone))
        step("prepare", lambda: op(dst, "clone-prepare", name=clone, spec=spec, peer=entry.host))
        report["pause_s"] = step("checkpoint", lambda: op(src, "clone-checkpoint", name=name))["pause_s"]
        address = {"address": mesh.host(target).overlay_ip, "port": AGENT_PORT}
        sent = step("transfer", lambda: op(src, "clone-transfer", name=name, target=address))
        report["bytes_wire"] = sent["bytes_wire"]
        step("restore", lambda: op(dst, "clone-restore", name=clone))
        health = step("health", lambda: op(dst, "clone-check", name=clone, cmd=check, timeout=timeout))
        report["health"] = health
        report["passed"] = bool(health["ok"])
        if not health["ok"]:
            report["error"] = (
                f"health check failed (exit {health.get('rc')}): {health.get('output', '')[-300:]}"
                if health.get("running")
                else "the clone was not running after restore"
            )
    except SkyferryError as exc:
        report["error"] = str(exc)
        report["hint"] = exc.hint
    finally:
        progress("discard")
        with contextlib.suppress(SkyferryError):
            op(src, "clone-discard", name=name)
        try:
            report["target_clean"] = op(dst, "clone-discard", name=clone, clone=clone)["clean"]
        except SkyferryError as exc:
            report["target_clean"] = False
            report["error"] = report["error"] or f"could not discard the clone on {target}: {exc}"
    after = src.call("GET", f"/v1/containers/{name}")
    report["source_untouched"] = (
        after.get("state") == "running" and after.get("pid") == before.get("pid") and not after["frozen_for_migration"]
    )
    if not report["source_untouched"] and not report["error"]:
        report["error"] = f"the source container changed: {before.get('pid')} -> {after}"
    report["passed"] = report["passed"] and report["source_untouched"] and report["target_clean"]
    return report


def rows(report: dict[str, Any]) -> list[list[str]]:
    health = report.get("health") or {}
    out = [
        ["test", report["id"]],
        ["container", f"{report['container']}: clone on {report['target']}, source on {report['source']}"],
        ["result", "PASSED" if report["passed"] else "FAILED"],
        ["health check", report.get("check") or "(clone running)"],
        ["  exit", str(health.get("rc", "-"))],
        ["source paused", f"{report['pause_s'] * 1000:.1f} ms" if report.get("pause_s") is not None else "-"],
        ["source untouched", str(report.get("source_untouched"))],
        ["target clean", str(report.get("target_clean"))],
    ]
    out += [[f"  {k}", f"{v * 1000:.1f} ms"] for k, v in report["steps"].items()]
    if report.get("error"):
        out.append(["error", report["error"]])
    return out


# Where each step of a test runs (timeline.WHERE's vocabulary, so the HTML report colours it alike).
WHERE = {"check": "source, target", "checkpoint": "source", "transfer": "source -> target"}


def section(report: dict[str, Any]) -> Section:
    """The test for the run's HTML report: its timed steps back to back (they run one after another; a step
    that raised has no time, the error says which), and the source's pause, within the checkpoint step,
    as the freeze."""
    found, at = [], 0.0
    health = report.get("health") or {}
    for label, seconds in report["steps"].items():
        status = "failed" if label == "health" and not health.get("ok") else "done"
        found.append(Span(label, WHERE.get(label, "target"), at, at + seconds * 1000, status))
        at += seconds * 1000
    paused = next((s for s in found if s.label == "checkpoint"), None)
    if paused and report.get("pause_s") is not None:
        end = paused.start_ms + report["pause_s"] * 1000
        found.append(Span("source paused", "source", paused.start_ms, end, "done", "freeze"))
    found.sort(key=lambda s: (s.start_ms, s.kind != "stage"))
    facts = [("health check", report.get("check") or "(clone running)"), ("exit", str(health.get("rc", "-"))),
             ("source paused", f"{report['pause_s'] * 1000:.1f} ms" if report.get("pause_s") is not None else "-"),
             ("source untouched", str(report.get("source_untouched"))),
             ("target clean", str(report.get("target_clean")))]  # fmt: skip
    if report.get("error"):
        facts.append(("error", report["error"]))
    return Section(
        id=report["id"], title=f"{report['container']}: clone on {report['target']}, source on {report['source']}",
        outcome="passed" if report["passed"] else "failed", hosts={"source": report["source"],
        "target": report["target"]}, spans=found, facts=facts, kind="test cutover",
        freeze_ms=report["pause_s"] * 1000 if report.get("pause_s") is not None else None,
        bytes_wire=report.get("bytes_wire"),
    )  # fmt: skip
