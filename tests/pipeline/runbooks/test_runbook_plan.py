"""Exit plans: every mistake gets an error naming its field, before anything moves (no hosts needed).

`exitplan.check` is given the mesh's hosts, where each container runs, and (for the memory check) what
each container uses and what each target has free, exactly as `resolve` passes the agents' numbers.
"""

from pathlib import Path

import pytest
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.runbooks import exitplan, placement

MIB = 1 << 20
HOSTS = {"local-1": "local", "local-2": "local", "local-3": "local", "local-4": "local"}
WHERE = {"a": "local-1", "b": "local-2", "c": "local-1"}
GOOD = """
name: leave-a
source: {hosts: [local-1, local-2]}
target: {provider: local, hosts: [local-3, local-4]}
waves:
  - {name: first, containers: [a, b], check: "true"}
  - {name: second, containers: [c]}
after: decommission
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    return path


def errors_of(plan: exitplan.Plan, **kw: object) -> list[tuple[str, str]]:
    return exitplan.check(plan, HOSTS, WHERE, **kw)[2]  # type: ignore[arg-type]


def test_a_good_plan_resolves_sources_and_targets(tmp_path: Path) -> None:
    plan = exitplan.load(write(tmp_path, GOOD))
    sources, targets, errors = exitplan.check(plan, HOSTS, WHERE)
    assert (sources, targets, errors) == (["local-1", "local-2"], ["local-3", "local-4"], [])
    assert plan.after == "decommission" and plan.waves[0].test and plan.waves[1].check is None


def test_unknown_host_is_named_by_its_field(tmp_path: Path) -> None:
    plan = exitplan.load(write(tmp_path, GOOD.replace("[local-1, local-2]", "[local-1, local-9]")))
    assert errors_of(plan) == [
        ("source.hosts[1]", "unknown host 'local-9' (mesh hosts: local-1, local-2, local-3, local-4)"),
        ("waves[0].containers[1]", "container 'b' runs on local-2, which is not a source host"),
    ]
    target = exitplan.load(write(tmp_path, GOOD.replace("[local-3, local-4]", "[local-3, cloud-b-1]")))
    assert errors_of(target)[0][0] == "target.hosts[1]" and "unknown host 'cloud-b-1'" in errors_of(target)[0][1]


def test_a_container_in_two_waves(tmp_path: Path) -> None:
    plan = exitplan.load(write(tmp_path, GOOD.replace("containers: [c]", "containers: [c, a]")))
    assert errors_of(plan) == [("waves[1].containers[1]", "container 'a' is already in wave 'first'")]


def test_a_wave_with_no_containers(tmp_path: Path) -> None:
    with pytest.raises(SkyferryError, match=r"waves\[1\]\.containers: a wave must name at least one container"):
        exitplan.load(write(tmp_path, GOOD.replace("containers: [c]", "containers: []")))


def test_a_target_without_enough_memory(tmp_path: Path) -> None:
    plan = exitplan.load(write(tmp_path, GOOD))
    needs = {n: placement.Need(n, mem * MIB) for n, mem in (("a", 300), ("b", 200), ("c", 100))}
    free = {"local-3": placement.Room("local-3", 250 * MIB, 2), "local-4": placement.Room("local-4", 250 * MIB, 2)}
    [(field, message)] = errors_of(plan, needs=needs, free=free)
    assert field == "target.hosts"
    assert "a (first) needs 300 MiB" in message and "local-3 has 250 MiB" in message
    assert "600 MiB in all" in message
    roomy = {h: placement.Room(h, 400 * MIB, 2) for h in free}
    assert errors_of(plan, needs=needs, free=roomy) == [], "300+100 on one, 200 on the other fits"


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        (("provider: local,", "provider: azure,"), "target.provider", "unknown provider 'azure'"),
        (("name: first", "name: First!"), "waves[0].name", "String should match pattern"),
        (("after: decommission", "after: burn"), "after", "Input should be 'keep' or 'decommission'"),
        (('check: "true"', 'chek: "true"'), "waves[0].chek", "unknown field"),
        (("name: leave-a\n", ""), "name", "Field required"),
    ],
)
def test_structural_mistakes_name_the_field(tmp_path: Path, change: tuple[str, str], field: str, message: str) -> None:
    with pytest.raises(SkyferryError) as err:
        exitplan.load(write(tmp_path, GOOD.replace(*change)))
    assert f"{field}: {message}" in str(err.value)


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SkyferryError, match="is not valid YAML"):
        exitplan.load(write(tmp_path, "waves: [unclosed"))
    with pytest.raises(SkyferryError, match="no plan file"):
        exitplan.load(tmp_path / "nope.yaml")


def test_unknown_container_and_overlapping_target(tmp_path: Path) -> None:
    text = GOOD.replace("containers: [c]", "containers: [zz]").replace("[local-3, local-4]", "[local-3, local-1]")
    assert errors_of(exitplan.load(write(tmp_path, text))) == [
        ("target.hosts[1]", "local-1 is also a source host"),
        ("waves[1].containers[0]", "unknown container 'zz'"),
    ]
