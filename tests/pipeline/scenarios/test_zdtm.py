"""CRIU's zdtm programs in skyferry containers, migrated live: the CI subset of docs/compatibility.md's
`## zdtm` matrix. Each program must end as the recorded full run says (docs/zdtm-results.json): a pass
that starts failing, or a refusal that turns into a failure inside the freeze, is a regression.
"""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit.mesh import local_mesh
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import containers
from skyferry.pipeline.scenarios import zdtm

ENGINE, MODE = "runc", "precopy"  # skyferry's default engine and mode


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Mesh]]:
    with local_mesh(tmp_path_factory, count=2, prefix="zd") as made:
        yield made


@pytest.fixture(scope="module")
def binaries() -> dict[str, Path]:
    return zdtm.build(zdtm.FAST)


def expected(program: str) -> zdtm.Cell:
    return next(c for c in zdtm.recorded().cells if (c.program, c.engine, c.mode) == (program, ENGINE, MODE))


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
@pytest.mark.parametrize("program", zdtm.FAST)
def test_program_ends_as_recorded(
    mesh: tuple[Path, Mesh], binaries: dict[str, Path], tmp_path: Path, program: str
) -> None:
    state, _ = mesh
    want = expected(program)
    archive = zdtm.image(binaries[program], tmp_path / f"{program}.tar")
    got = zdtm.run_cell(state, program, ENGINE, MODE, archive)
    assert (got.outcome, got.stage) == (want.outcome, want.stage), got
    if got.outcome in ("refused", "failed") and got.stage != "verify":
        assert got.rolled_back, f"the source copy must run on and pass after the rollback: {got}"
    assert zdtm.container_name(program, ENGINE, MODE) not in {r["name"] for r in containers.live(state)}


def test_fast_subset_is_in_the_recorded_matrix() -> None:
    """Every CI program has a recorded outcome, and each recorded cell names a program the matrix runs."""
    cells = zdtm.recorded().cells
    assert {c.program for c in cells} == {p.name for p in zdtm.PROGRAMS}
    for program in zdtm.FAST:
        assert expected(program).outcome in ("pass", "refused", "failed")


def test_write_doc_replaces_only_the_generated_table(tmp_path: Path) -> None:
    doc, results = tmp_path / "compatibility.md", tmp_path / "results.json"
    head = "# Compatibility\n\n## workloads\n\nkept\n\n## zdtm\n\nmethod, kept\n\n"
    doc.write_text(f"{head}{zdtm.SECTION.begin}\nSTALE TABLE\n{zdtm.SECTION.end}\n\nquirks, kept\n")
    cell = zdtm.Cell(program="pipe00", engine="runc", mode="precopy", outcome="pass")
    bad = zdtm.Cell(program="stopped", engine="runc", mode="precopy", outcome="refused", stage="check",
                    reason="a stopped task", rolled_back=True)  # fmt: skip
    zdtm.write_doc(zdtm.Matrix(when="2026-12-03", kernel="6.18", criu="4.2.1", cells=[cell, bad]), doc, results)
    text = doc.read_text()
    assert "kept\n" in text and "method, kept" in text and "quirks, kept" in text and "STALE TABLE" not in text
    assert "| `pipe00` | pipe |" in text and "refused (check) [1]" in text
    assert "1. `stopped`, runc precopy: refused at check: a stopped task. Rolled back" in text
    assert zdtm.Matrix.model_validate_json(results.read_text()).cells == [cell, bad]


def test_write_doc_adds_its_section_to_a_doc_without_one(tmp_path: Path) -> None:
    doc, results = tmp_path / "compatibility.md", tmp_path / "results.json"
    doc.write_text("# Compatibility\n\nprose, kept\n")
    zdtm.write_doc(zdtm.Matrix(when="2026-12-03", kernel="6.18", criu="4.2.1", cells=[]), doc, results)
    text = doc.read_text()
    assert text.startswith("# Compatibility\n\nprose, kept\n\n## zdtm\n\n" + zdtm.SECTION.begin)
    assert text.endswith(zdtm.SECTION.end + "\n")


def test_merge_replaces_the_rerun_cells_in_place() -> None:
    def cell(program: str, mode: str, outcome: str) -> zdtm.Cell:
        return zdtm.Cell(program=program, engine="runc", mode=mode, outcome=outcome)  # type: ignore[arg-type]

    old = zdtm.Matrix(when="2026-12-01", kernel="6.18", criu="4.2.1",
                      cells=[cell("fifo", "precopy", "failed"), cell("pipe00", "precopy", "pass")])  # fmt: skip
    new = zdtm.Matrix(when="2026-12-03", kernel="6.18", criu="4.2.1",
                      cells=[cell("fifo", "precopy", "pass"), cell("fifo", "hybrid", "pass")])  # fmt: skip
    merged = zdtm.merge(old, new)
    assert merged.when == "2026-12-03"
    assert [(c.program, c.mode, c.outcome) for c in merged.cells] == [
        ("fifo", "precopy", "pass"), ("pipe00", "precopy", "pass"), ("fifo", "hybrid", "pass")]  # fmt: skip
