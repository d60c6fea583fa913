"""The check stage's compatibility check, on real local hosts with real CRIU: a compatible pair passes;
a target whose CPU or kernel lacks what the source's dump would need is refused at check, before any
freeze, with the container still running untouched on the source.

Local hosts share one kernel and CPU, so the pairs that differ are made from real parts (tests/kit/confine.py):
the source agent's CRIU describes a CPU with one instruction set more (its real cpuinfo image, one bit
set with pycriu), or the target agent's CRIU runs where userfaultfd(2) is missing (a seccomp filter).
"""

import base64
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from kit import confine
from kit.mesh import local_mesh
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import agentctl, containers, migration
from skyferry.pipeline.controller.journal import Journal
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi import compat
from skyferry.pipeline.scenarios import demo as scenario

pytestmark = [pytest.mark.integration, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Mesh]]:
    with local_mesh(tmp_path_factory, count=2, prefix="c") as made:
        yield made


@contextmanager
def agent_with_criu(state: Path, m: Mesh, host: str, criu: Path) -> Iterator[None]:
    """Restart `host`'s agent with SKYFERRY_CRIU=`criu` (its containers go down with it), and back."""
    agentctl.stop_agents(m, state, hosts=[host])
    os.environ["SKYFERRY_CRIU"] = str(criu)
    try:
        agentctl.start_agents(m, state)
    finally:
        del os.environ["SKYFERRY_CRIU"]
    try:
        yield
    finally:
        agentctl.stop_agents(m, state, hosts=[host])
        agentctl.start_agents(m, state)


def facts(state: Path, m: Mesh, host: str) -> dict:
    return agentctl.client(state, m, host).call("GET", "/v1/facts")


def assert_untouched(state: Path, m: Mesh, name: str, client: scenario.CounterClient) -> None:
    """Refused at check: nothing but the check ran, the container runs (not paused, not locked) on
    local-1, local-2 has nothing, and the client's connection never noticed."""
    mig = Journal(state).all()[-1]
    assert mig.state == "rolled-back" and set(Journal(state).stage_status(mig.id)) == {"check"}
    info = agentctl.client(state, m, "local-1").call("GET", f"/v1/containers/{name}")
    assert info["state"] == "running" and not info["frozen_for_migration"], info
    assert not agentctl.client(state, m, "local-2").call("GET", "/v1/containers")
    client.wait_for(client.progress() + 3)
    seen = client.stop()
    assert seen["survived"], seen["errors"]


def test_agents_report_kernel_features_as_criu_answers_them(mesh: tuple[Path, Mesh]) -> None:
    state, m = mesh
    found = facts(state, m, "local-1")["features"]
    assert set(found) == {"tcp_repair", *compat.CRIU_FEATURES}
    assert found["tcp_repair"] is True and found["uffd-noncoop"] is True  # this machine (FIELD-NOTES)
    assert found["mem_dirty_track"] is False  # no soft-dirty in this kernel: reported, never compared


def test_a_compatible_pair_passes_the_check(mesh: tuple[Path, Mesh], tmp_path: Path) -> None:
    state, _ = mesh
    scenario.start_counter(state, "local-1", "fits", tmp_path)
    try:
        report = migration.migrate(state, "fits", "local-2", mode="hybrid")
        assert report["state"] == "done"
        check = next(
            t["detail"] for t in Journal(state).transitions(report["id"]) if t["stage"] == "check" and t["detail"]
        )
        assert check["cpu"] == "criu cpuinfo check passed", check
    finally:
        containers.remove(state, "fits")


def test_criu_cpuinfo_check_refuses_an_image_of_a_richer_cpu(mesh: tuple[Path, Mesh], tmp_path: Path) -> None:
    """The real `criu cpuinfo check` on a real agent: the host's own image passes (positive control), the
    same image with one instruction set this CPU lacks is refused with CRIU's reason."""
    state, m = mesh
    agent = agentctl.client(state, m, "local-2")
    image = base64.b64decode(agentctl.client(state, m, "local-1").call("GET", "/v1/cpuinfo")["image"])
    assert agent.call("POST", "/v1/cpuinfo/check", {"image": base64.b64encode(image).decode()}) == {
        "ok": True,
        "error": None,
    }
    path = tmp_path / "cpuinfo.img"
    path.write_bytes(image)
    confine.add_cpu_feature(path)
    verdict = agent.call("POST", "/v1/cpuinfo/check", {"image": base64.b64encode(path.read_bytes()).decode()})
    assert verdict["ok"] is False
    assert "CPU instruction capabilities do not match run time" in verdict["error"], verdict


def test_a_target_cpu_without_the_source_features_is_refused_before_the_freeze(
    mesh: tuple[Path, Mesh], tmp_path: Path
) -> None:
    state, m = mesh
    with agent_with_criu(state, m, "local-1", confine.richer_cpu_criu(tmp_path)):
        info = scenario.start_counter(state, "local-1", "cpu", tmp_path)
        client = scenario.CounterClient(m.hosts["local-2"].netns or "", info["ip"], tmp_path).start()
        try:
            client.wait_for(3)
            with pytest.raises(SkyferryError, match="local-2's CPU lacks features local-1's CPU has") as refused:
                migration.migrate(state, "cpu", "local-2")
            assert "CPU instruction capabilities do not match run time" in str(refused.value)
            assert "--cpu-cap" in (refused.value.hint or "")
            assert_untouched(state, m, "cpu", client)
        finally:
            client.stop()
            containers.remove(state, "cpu")


def test_a_target_without_userfaultfd_is_refused_for_lazy_modes_only(mesh: tuple[Path, Mesh], tmp_path: Path) -> None:
    state, m = mesh
    with agent_with_criu(state, m, "local-2", confine.no_userfaultfd_criu(tmp_path)):
        assert facts(state, m, "local-2")["features"]["uffd-noncoop"] is False
        assert facts(state, m, "local-1")["features"]["uffd-noncoop"] is True
        info = scenario.start_counter(state, "local-1", "lazy", tmp_path)
        client = scenario.CounterClient(m.hosts["local-2"].netns or "", info["ip"], tmp_path).start()
        try:
            client.wait_for(3)
            for mode in ("postcopy", "hybrid"):
                with pytest.raises(SkyferryError, match=f"cannot run a {mode} migration: local-2 lacks uffd-noncoop"):
                    migration.migrate(state, "lazy", "local-2", mode=mode)
            assert_untouched(state, m, "lazy", client)
            # Positive control: the same pair passes for pre-copy, which needs no userfaultfd.
            assert migration.migrate(state, "lazy", "local-2", mode="precopy")["state"] == "done"
        finally:
            client.stop()
            containers.remove(state, "lazy")


def test_a_dump_feature_the_target_lacks_follows_the_source() -> None:
    """timens: needed on the target only when the source has it (its dumps may record a time namespace)."""
    src = {"host": "a", "features": {"tcp_repair": True, "timens": True}}
    dst = {"host": "b", "features": {"tcp_repair": True, "timens": False}}
    assert [str(x) for x in compat.missing(src, dst, "precopy")] == [
        "b lacks timens (a has it and its dumps may record it)"
    ]
    assert compat.missing(dst, src, "precopy") == []
