"""report.html of real runbook runs, opened from disk in headless chromium: a small evacuation on a local
mesh (two counters, local-1 -> local-2), a test cutover whose health check prints markup (as a hostile
container could: its output lands in the report's error), and `migrations show --timeline --html`.

Each page must load with no console error and fetch nothing but itself, hold a section per migration with
every stage, its pre-copy rounds and the freeze, and keep the container's markup as text. The evacuation's
screenshot is saved in the test's tmp dir (docs/report-example.png is one such screenshot)."""

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit.browser import Visit, chromium, visit
from kit.runbook import cli, counter, local_mesh, remove_all
from playwright.sync_api import Browser, Locator

pytestmark = [pytest.mark.integration, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

STAGES = ["check", "prepare", "precopy", "checkpoint", "cutover", "transfer", "restore", "confirm", "cleanup"]
MARKUP = '<b id="pwned">owned</b><script>document.title="pwned"</script>'


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One evacuation, one failing test cutover and one single-migration page, all through the CLI."""
    work = tmp_path_factory.mktemp("work")
    with local_mesh(tmp_path_factory.mktemp("state"), 2) as mesh:
        state = mesh.state
        assert state is not None
        try:
            counter(state, "local-1", "web", work, labels={"priority": "5"})
            counter(state, "local-1", "cache", work)
            evacuated = cli("evacuate", "--host", "local-1", "--json")
            assert evacuated.returncode == 0, evacuated.stdout + evacuated.stderr
            tested = cli("migrate", "web", "--to", "local-1", "--test", "--check", f"echo '{MARKUP}'; exit 1", "--json")
            assert tested.returncode == 1, tested.stdout + tested.stderr
            summary = json.loads(evacuated.stdout)
            one = work / "one.html"
            first = summary["results"][0]["migration_id"]
            shown = cli("migrations", "show", first, "--timeline", "--html", str(one))
            assert shown.returncode == 0, shown.stderr
            yield {"evacuation": summary, "test": json.loads(tested.stdout), "one": one, "first": first}
        finally:
            remove_all(state)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as b:
        yield b


def clean(seen: Visit, path: Path) -> None:
    assert seen.console_errors == [], seen.console_errors
    assert seen.failed == [] and seen.requests == [path.resolve().as_uri()], seen.requests


def spans_of(section: Locator) -> list[list[str]]:
    rows = section.locator("table.spans tbody tr")
    return [[c.strip() for c in r.locator("td").all_inner_texts()] for r in rows.all()]


def test_the_evacuation_report_shows_every_migration_in_chromium(runs: dict, browser: Browser, tmp_path: Path) -> None:
    page_file = Path(runs["evacuation"]["report_dir"]) / "report.html"
    with visit(browser, page_file) as seen:
        clean(seen, page_file)
        page = seen.page
        summary = page.locator("section.summary").inner_text()
        assert "migrations\t2" in summary and "done 2" in summary and "freeze min / median / max" in summary
        sections = page.locator("section.migration")
        assert sections.count() == 2
        for i in range(2):
            rows = spans_of(sections.nth(i))
            names = [r[0] for r in rows]
            assert [n for n in names if n in STAGES] == STAGES, names
            assert any(n.startswith("round 1:") for n in names), "pre-copy rounds are rows"
            freeze = [r for r in rows if r[0] == "freeze"]
            assert len(freeze) == 1 and freeze[0][1] == "local-1" and freeze[0][4] == "done", freeze
            assert all(r[4] == "done" for r in rows)
            bars = sections.nth(i).locator("svg rect.bar")
            assert bars.count() == len(rows) - 1, "a bar per row but the freeze, which is the band"
            assert sections.nth(i).locator("svg rect.freeze").count() == 1
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        print(f"screenshot: {shot}")


def test_a_containers_markup_in_a_test_cutover_report_stays_text(runs: dict, browser: Browser) -> None:
    page_file = Path(runs["test"]["report_dir"]) / "report.html"
    assert MARKUP in runs["test"]["error"], "the check's output is in the error: the page must show it"
    with visit(browser, page_file) as seen:
        clean(seen, page_file)  # a script or image that landed would be refused by the CSP: a console error
        page = seen.page
        assert page.locator("#pwned").count() == 0 and page.locator("script").count() == 0
        section = page.locator("section.migration")
        assert section.count() == 1 and "failed" in section.locator("h2").inner_text()
        assert MARKUP in section.locator("table.facts").inner_text(), "shown as the text it is"
        status = {r[0]: r[4] for r in spans_of(section)}
        assert list(status)[:3] == ["check", "discard-leftovers", "prepare"] and "source paused" in status
        assert status["health"] == "failed" and status["restore"] == "done"


def test_migrations_show_html_is_the_same_section(runs: dict, browser: Browser) -> None:
    evacuation = Path(runs["evacuation"]["report_dir"]) / "report.html"
    with visit(browser, evacuation) as seen:
        expected = spans_of(seen.page.locator(f"section#m-{runs['first']}"))
    with visit(browser, runs["one"]) as seen:
        clean(seen, runs["one"])
        assert seen.page.locator("section.migration").count() == 1
        assert spans_of(seen.page.locator(f"section#m-{runs['first']}")) == expected
