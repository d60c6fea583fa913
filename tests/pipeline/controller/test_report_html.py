"""The HTML report of migrations (pipeline/controller/report_html.py), from a real journal: its table and
plot hold every stage and round with the freeze marked, it loads nothing from outside, and hostile strings
(a container name, an error carrying a container's output) stay text, in a parser and in headless chromium.
The positive controls render the same page with escaping switched off and see the injection land."""

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from kit.browser import chromium, visit
from kit.runbook import cli
from skyferry.pipeline.controller import report_html, timeline
from skyferry.pipeline.controller.journal import Journal

HOSTILE = '<b id="pwned">owned</b><script>document.title="pwned"</script><img src="x" onerror="alert(1)">'
# (stage, status, seconds after the start, detail) as the runner journals a pre-copy migration
STORY = [
    ("check", "started", 0.00, None), ("check", "done", 0.03, None),
    ("prepare", "started", 0.03, None), ("prepare", "done", 0.10, None),
    ("precopy", "started", 0.10, None),
    ("precopy", "done", 0.70, {"rounds": [{"seq": 1, "duration": 0.4, "bytes_out": 1_440_000},
                                          {"seq": 2, "duration": 0.1, "bytes_out": 10_822}]}),
    ("checkpoint", "started", 0.70, None), ("checkpoint", "done", 0.96, None),
    ("transfer", "started", 0.96, None), ("transfer", "done", 1.04, None),
    ("cutover", "started", 1.04, None), ("cutover", "done", 1.06, None),
    ("restore", "started", 1.06, None), ("restore", "done", 1.28, None),
    ("confirm", "started", 1.28, None), ("confirm", "done", 1.43, None),
    ("cleanup", "started", 1.43, None), ("cleanup", "done", 1.44, None),
]  # fmt: skip


# ... and one whose restore failed: undone in reverse, the source thawed by the checkpoint's undo
ROLLED_BACK = [
    *STORY[:12], ("restore", "started", 1.06, None), ("restore", "failed", 1.20, {"error": "criu restore"}),
    ("cutover", "undoing", 1.20, None), ("cutover", "undone", 1.23, None),
    ("checkpoint", "undoing", 1.23, None), ("checkpoint", "undone", 1.30, None),
]  # fmt: skip


def journalled(
    state: Path, container: str = "web", error: str | None = None, freeze_ms: float = 580.0, story: list = STORY
) -> str:
    """A finished migration in a real journal, its transitions at the times of `story`."""
    journal = Journal(state)
    mig = journal.begin(container, "local-1", "local-2", "precopy")
    for stage, status, after, detail in story:
        journal.conn.execute(
            "INSERT INTO transitions (migration, stage, status, at, detail) VALUES (?,?,?,?,?)",
            (mig.id, stage, status, mig.started + after, json.dumps(detail) if detail else None),
        )
    report = {"freeze_ms": freeze_ms, "total_ms": 1440.0, "bytes_wire": 1_476_224, "bytes_at_freeze": 25_402,
              "rounds": [{"seq": 1}, {"seq": 2}], "precopy_method": "content", "precopy_stop": "converged"}  # fmt: skip
    journal.finish(mig.id, "done", error=error, report=report)
    return mig.id


class Tree(HTMLParser):
    """Every element with its attributes, and the page's text."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.rows: list[tuple[str | None, list[str]]] = []
        self._row: list[str] | None = None
        self._in_cell = False
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))
        if tag == "tr":
            self._row = []
            self.rows.append((dict(attrs).get("class"), self._row))
        elif tag == "td" and self._row is not None:
            self._row.append("")
            self._in_cell = True

    def handle_endtag(self, tag: str) -> None:
        self._in_cell = self._in_cell and tag != "td"

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._row and self._in_cell:
            self._row[-1] += data

    def ids(self) -> set[str]:
        return {a["id"] or "" for _, a in self.elements if "id" in a}


def test_each_stage_and_round_is_a_row_and_a_bar_with_the_freeze_marked(state: Path) -> None:
    journal = Journal(state)
    first, second = journalled(state), journalled(state, "db", freeze_ms=120.0)
    page = report_html.page("evacuate-x", [report_html.migration_section(journal, m) for m in (first, second)])
    tree = Tree(page)

    spans = [cells for css, cells in tree.rows if css is not None and len(cells) == 5]  # the span tables
    stages = ["check", "prepare", "precopy", "checkpoint", "transfer", "cutover", "restore", "confirm", "cleanup"]
    names = [c[0] for c in spans[: len(spans) // 2]]
    assert [n for n in names if n in stages] == stages
    assert [n for n in names if n.startswith("round")] == ["round 1: 1.44 MB", "round 2: 10.82 kB"]
    freeze = [c for css, c in tree.rows if css == "freeze"]
    assert len(freeze) == 2 and freeze[0][1] == "local-1", "the freeze is marked once per migration, on the source"
    assert freeze[0][2:4] == ["700", "580.0"], "from the checkpoint's start to the restore's end"
    assert next(c[1] for c in spans if c[0] == "transfer") == "local-1 -> local-2"

    bars = [a for tag, a in tree.elements if tag == "rect" and "bar" in (a.get("class") or "")]
    assert len(bars) == 2 * (len(stages) + 2), "one bar per stage and round"
    assert sum(1 for tag, a in tree.elements if tag == "rect" and a.get("class") == "freeze") == 2
    text = "".join(tree.text)
    assert "freeze min / median / max120.0 ms / 350.0 ms / 580.0 ms" in text
    assert "done 2" in text and "2.95 MB" in text, "outcomes and bytes summed over both"


def test_the_freeze_starts_at_the_pause_after_the_replies_landed(state: Path) -> None:
    """The checkpoint's first moments let the container's replies land before its pause (agent/settle.py):
    the container still runs then, so the freeze starts after them. Without them (control) it starts with
    the checkpoint."""
    settled = [(*t[:3], {"settle_s": 0.1}) if t[:2] == ("checkpoint", "done") else t for t in STORY]
    for story, start in ((settled, 800), (STORY, 700)):
        mig = journalled(state, story=story)
        (freeze,) = [s for s in timeline.spans(Journal(state), mig) if s.kind == "freeze"]
        assert (round(freeze.start_ms), round(freeze.end_ms)) == (start, 1280)


def test_a_rolled_back_migration_shows_its_undo_steps_and_where_the_source_thawed(state: Path) -> None:
    mig = journalled(state, error="rolled back: web runs on local-1", story=ROLLED_BACK)
    Journal(state).conn.execute("UPDATE migrations SET state='rolled-back' WHERE id=?", (mig,))
    tree = Tree(report_html.page("r", [report_html.migration_section(Journal(state), mig)]))
    rows = {c[0]: (css, c) for css, c in tree.rows if css is not None and len(c) == 5}
    assert rows["restore"][1][4] == "failed" and rows["undo checkpoint"][0] == "undo"
    assert rows["freeze"][1][2:] == ["700", "600.0", "thawed on the source"], "to the checkpoint's undo"
    assert "rolled-back 1" in "".join(tree.text)
    assert any(tag == "span" and a.get("class") == "bad" for tag, a in tree.elements), "the outcome is marked bad"


def test_a_migration_whose_controller_died_shows_what_was_running(state: Path) -> None:
    mig = Journal(state).begin("web", "local-1", "local-2", "precopy").id
    journal = Journal(state)
    for stage, status, after, _ in STORY[:9]:  # the transfer started, nothing after it
        journal.conn.execute("INSERT INTO transitions (migration, stage, status, at) VALUES (?,?,?,?)",
                             (mig, stage, status, journal.get(mig).started + after))  # fmt: skip
    tree = Tree(report_html.page("r", [report_html.migration_section(journal, mig)]))
    rows = {c[0]: c for css, c in tree.rows if css is not None and len(c) == 5}
    assert rows["transfer"][4] == "running" and rows["freeze"][4] == "running"
    dashed = [a for tag, a in tree.elements if tag == "rect" and a.get("stroke-dasharray")]
    assert len(dashed) == 1, "the one stage without an end is drawn hollow"


def test_the_page_loads_nothing_from_outside(state: Path) -> None:
    page = report_html.page("r", [report_html.migration_section(Journal(state), journalled(state))])
    tree = Tree(page)
    assert not [tag for tag, _ in tree.elements if tag in ("script", "link", "img", "iframe", "object")]
    links = [a.get("href") or a.get("src") or "" for _, a in tree.elements if "href" in a or "src" in a]
    assert links and all(h.startswith("#") for h in links), links
    assert f'content="{report_html.CSP}"' in page and "default-src 'none'" in report_html.CSP


def hostile_page(state: Path) -> str:
    journal = Journal(state)
    mig = journalled(state, container=HOSTILE, error=f"health check failed: {HOSTILE}")
    return report_html.page(f"run {HOSTILE}", [report_html.migration_section(journal, mig)])


def test_hostile_strings_stay_text(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = Tree(hostile_page(state))
    assert "pwned" not in tree.ids()
    assert not [tag for tag, _ in tree.elements if tag in ("script", "img", "b")]
    assert HOSTILE in "".join(tree.text), "shown as the text it is"

    monkeypatch.setattr(report_html, "escape", lambda s, quote=True: s)  # positive control: no escaping
    tree = Tree(hostile_page(state))
    assert "pwned" in tree.ids() and any(tag == "script" for tag, _ in tree.elements)


def test_headless_chromium_shows_hostile_strings_as_text(
    state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    safe, unsafe = tmp_path / "safe.html", tmp_path / "unsafe.html"
    safe.write_text(hostile_page(state))
    monkeypatch.setattr(report_html, "escape", lambda s, quote=True: s)
    unsafe.write_text(hostile_page(state))
    with chromium() as browser:
        with visit(browser, safe) as seen:
            assert seen.console_errors == [] and seen.failed == []
            assert seen.requests == [safe.resolve().as_uri()], "nothing but the file itself"
            assert seen.page.locator("#pwned").count() == 0 and seen.page.locator("img, script").count() == 0
            assert seen.page.title() == f"run {HOSTILE}"
            assert HOSTILE in seen.page.locator("section.migration h2").inner_text()
        # The control: unescaped, the element lands in the DOM; the page's CSP still refuses the script and
        # the image, and says so on the console (which is how the check above would see a slip).
        with visit(browser, unsafe) as seen:
            assert seen.page.locator("#pwned").count() >= 1
            assert seen.page.title() != "pwned", "CSP: no inline script runs"
            assert any("Content Security Policy" in e for e in seen.console_errors), seen.console_errors


def test_migrations_show_html_writes_the_page_or_says_why_not(state: Path, tmp_path: Path) -> None:
    mig = journalled(state)
    shown = cli("migrations", "show", mig, "--timeline", "--html", str(tmp_path / "one.html"))
    assert shown.returncode == 0 and f"report: {tmp_path / 'one.html'}" in shown.stderr, shown.stderr
    assert f'id="m-{mig}"' in (tmp_path / "one.html").read_text() and "freeze" in shown.stdout
    refused = cli("migrations", "show", mig, "--html", str(tmp_path / "no" / "such" / "dir.html"))
    assert refused.returncode == 2 and "cannot write" in refused.stderr and "Traceback" not in refused.stderr
