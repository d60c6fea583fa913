"""One self-contained HTML page for the people on call: a summary on top, then per migration its facts, an
inline SVG of its stages and pre-copy rounds on one time axis (coloured by the host they ran on, the freeze
shaded across all of them) and the same spans as a table.

The page opens from disk: no script, no external asset, no server. Every string is escaped where it is
written (container names, errors and health-check output come from users and their containers), and the
page's Content-Security-Policy forbids scripts and fetches, so a slip could neither run nor call out.
"""

import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from html import escape

from skyferry.pipeline.controller.journal import Journal
from skyferry.pipeline.controller.timeline import Span, size, spans

CSP = "default-src 'none'; style-src 'unsafe-inline'"
GOOD = ("done", "passed", "already-there")

# Bar colours by where a span ran; the legend names the hosts.
COLOURS = {"source": "#3b6fb6", "target": "#2e9a5a", "link": "#8a5cc2", "both": "#6b7785", "every": "#a0a7b0"}
UNDO, FAILED, FREEZE = "#e0902f", "#c93c3c", "#d64545"

# The plot's geometry, in SVG user units (pixels at 100 % zoom).
LABEL_W, PLOT_W, ROW_H, BAR_H, TOP, BOTTOM = 150, 780, 22, 14, 28, 38


@dataclass
class Section:
    """One migration (or test cutover) as the page shows it."""

    id: str
    title: str  # "web: local-1 -> local-2"
    outcome: str  # the journal's state (done, rolled-back, …) or a test's passed/failed
    hosts: dict[str, str]  # "source" / "target" -> host name
    spans: list[Span] = field(default_factory=list)
    facts: list[tuple[str, str]] = field(default_factory=list)
    freeze_ms: float | None = None
    bytes_wire: int | None = None
    kind: str = "migration"


def migration_section(journal: Journal, mig_id: str) -> Section:
    """A migration from the journal alone: so a failed one, or one whose controller died, reads the same."""
    mig = journal.get(mig_id)
    report = mig.report or {}
    found = spans(journal, mig_id)
    freeze = report.get("freeze_ms")
    facts = [("mode", mig.mode), ("outcome", mig.state), ("freeze", ms(freeze)), ("total", ms(report.get("total_ms")))]
    if report.get("bytes_wire") is not None:
        inside = report.get("bytes_at_freeze")
        facts.append(("bytes on the wire", size(report["bytes_wire"]) + (f" ({size(inside)} in the freeze)"
                                                                           if inside is not None else "")))  # fmt: skip
    if report.get("rounds"):
        method = report.get("precopy_method") or "content"
        facts.append(("pre-copy", f"{len(report['rounds'])} rounds by {method}, stopped: {report.get('precopy_stop')}"))
    if mig.error:
        facts.append(("error", mig.error))
    return Section(
        id=mig.id, title=f"{mig.container}: {mig.source} -> {mig.target}", outcome=mig.state,
        hosts={"source": mig.source, "target": mig.target}, spans=found, facts=facts, freeze_ms=freeze,
        bytes_wire=report.get("bytes_wire"),
    )  # fmt: skip


def page(title: str, sections: list[Section], facts: list[tuple[str, str]] | None = None) -> str:
    """The whole page: `facts` about the run (what the caller knows), the summary, then each section."""
    body = [f"<h1>{escape(title)}</h1>", _summary(sections, facts or [])]
    body += [_section(s) for s in sections]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


# --- summary --------------------------------------------------------------------------------------------


def _summary(sections: list[Section], facts: list[tuple[str, str]]) -> str:
    rows = list(facts)
    for kind, n in Counter(s.kind for s in sections).items():
        rows.append((f"{kind}s", str(n)))
    if sections:
        outcomes = Counter(s.outcome for s in sections)
        rows.append(("outcomes", ", ".join(f"{k} {n}" for k, n in outcomes.most_common())))
    freezes = sorted(s.freeze_ms for s in sections if s.freeze_ms is not None)
    if freezes:
        rows.append(("freeze min / median / max",
                     f"{ms(freezes[0])} / {ms(statistics.median(freezes))} / {ms(freezes[-1])}"))  # fmt: skip
    sent = [s.bytes_wire for s in sections if s.bytes_wire is not None]
    if sent:
        rows.append(("bytes on the wire", size(sum(sent))))
    out = ['<section class="summary"><h2>Summary</h2>', _facts(rows)]
    if sections:
        out.append("<table class=\"runs\"><thead><tr><th>id</th><th>what</th><th>outcome</th><th>freeze</th>"
                   "<th>bytes</th></tr></thead><tbody>")  # fmt: skip
        for s in sections:
            out.append(
                f'<tr><td><a href="#{_anchor(s.id)}">{escape(s.id)}</a></td><td>{escape(s.title)}</td>'
                f'<td class="{_outcome_class(s.outcome)}">{escape(s.outcome)}</td><td class="num">{ms(s.freeze_ms)}'
                f'</td><td class="num">{escape(size(s.bytes_wire))}</td></tr>'
            )
        out.append("</tbody></table>")
    return "".join(out) + "</section>"


def _facts(rows: list[tuple[str, str]]) -> str:
    items = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in rows)
    return f'<table class="facts">{items}</table>'


# --- one migration --------------------------------------------------------------------------------------


def _section(s: Section) -> str:
    head = (f'<section class="migration" id="{_anchor(s.id)}"><h2>{escape(s.title)} '
            f'<span class="{_outcome_class(s.outcome)}">{escape(s.outcome)}</span></h2>'
            f'<p class="id">{escape(s.kind)} {escape(s.id)}</p>')  # fmt: skip
    if not s.spans:
        return head + _facts(s.facts) + "<p>No stage was recorded.</p></section>"
    return head + _facts(s.facts) + plot(s.spans, s.hosts) + _table(s.spans, s.hosts) + "</section>"


def _table(found: list[Span], hosts: dict[str, str]) -> str:
    rows = []
    for s in found:
        css = {"freeze": "freeze", "round": "round", "undo": "undo"}.get(s.kind, "")
        rows.append(
            f'<tr class="{css}"><td class="span">{escape(s.label)}</td><td>{escape(where(s, hosts))}</td>'
            f'<td class="num">{s.start_ms:.0f}</td><td class="num">{s.end_ms - s.start_ms:.1f}</td>'
            f'<td class="{_outcome_class(s.status)}">{escape(s.status)}</td></tr>'
        )
    return ('<table class="spans"><thead><tr><th>span</th><th>where</th><th>start, ms</th><th>took, ms</th>'
            f'<th>status</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')  # fmt: skip


def plot(found: list[Span], hosts: dict[str, str]) -> str:
    """The spans as an inline SVG: a row each on one time axis, the freeze shaded across every row."""
    rows = [s for s in found if s.kind != "freeze"]
    freeze = next((s for s in found if s.kind == "freeze"), None)
    end = max((s.end_ms for s in found), default=0.0) or 1.0
    step = _tick_step(end)
    unit = "s" if step >= 1000 else "ms"
    height = TOP + len(rows) * ROW_H + BOTTOM
    width = LABEL_W + PLOT_W + 70

    def x(t: float) -> float:
        return LABEL_W + t / end * PLOT_W

    out = [f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="timeline">']  # fmt: skip
    t = 0.0
    while t <= end + 1e-9:
        tick = t / 1000 if unit == "s" else t
        out.append(f'<line x1="{x(t):.1f}" y1="{TOP - 4}" x2="{x(t):.1f}" y2="{height - BOTTOM}" class="grid"/>'
                   f'<text x="{x(t):.1f}" y="{height - BOTTOM + 14}" class="tick">{tick:g}</text>')  # fmt: skip
        t += step
    if freeze is not None:
        x0, x1 = x(freeze.start_ms), max(x(freeze.end_ms), x(freeze.start_ms) + 1)
        # the label reads from the band's start, or ends at the band's end when the band is far right
        anchor = f'x="{x0:.1f}"' if x0 < LABEL_W + PLOT_W * 0.6 else f'x="{x1:.1f}" text-anchor="end"'
        out.append(f'<rect x="{x0:.1f}" y="{TOP - 6}" width="{x1 - x0:.1f}" height="{len(rows) * ROW_H + 6}" '
                   f'class="freeze"><title>{escape(_tip(freeze, hosts))}</title></rect>'
                   f'<text {anchor} y="{TOP - 10}" class="freeze-label">{escape(freeze.label)} '
                   f'{freeze.end_ms - freeze.start_ms:.0f} ms{_unless_done(freeze.status)}</text>')  # fmt: skip
    for i, s in enumerate(rows):
        y = TOP + i * ROW_H
        indent = 14 if s.kind == "round" else 0
        out.append(f'<text x="{6 + indent}" y="{y + ROW_H / 2 + 4:.1f}" class="label">{escape(s.label)}</text>')
        x0 = x(s.start_ms)
        w = max(x(s.end_ms) - x0, 1.5)
        extra = ' fill-opacity=".65"' if s.kind == "round" else ""  # rounds: lighter than their stage
        if s.status == "running":  # no end recorded: hollow, dashed
            extra += f' fill-opacity=".3" stroke="{_fill(s)}" stroke-dasharray="4 2"'
        out.append(f'<rect x="{x0:.1f}" y="{y + (ROW_H - BAR_H) / 2:.1f}" width="{w:.1f}" height="{BAR_H}" '
                   f'fill="{_fill(s)}" class="bar {"bad" if s.status == "failed" else ""}"{extra}>'
                   f'<title>{escape(_tip(s, hosts))}</title></rect>')  # fmt: skip
        took = f"{s.end_ms - s.start_ms:.0f} ms"
        out.append(f'<text x="{x0 + w + 4:.1f}" y="{y + ROW_H / 2 + 4:.1f}" class="took">{took}</text>')
    out.append(f'<text x="{LABEL_W + PLOT_W:.1f}" y="{height - 5}" class="axis">{unit} since it began</text></svg>')
    return "<figure>" + "".join(out) + _legend(found, hosts) + "</figure>"


def _legend(found: list[Span], hosts: dict[str, str]) -> str:
    seen = {_lane(s) for s in found if s.kind in ("stage", "round")}
    source, target = hosts.get("source", "?"), hosts.get("target", "?")
    names = {"source": f"{source} (source)", "link": f"{source} -> {target}", "target": f"{target} (target)",
             "both": "both hosts", "every": "every mesh member"}  # fmt: skip
    items = [(COLOURS[lane], name) for lane, name in names.items() if lane in seen]
    if any(s.kind == "undo" for s in found):
        items.append((UNDO, "undo (rollback)"))
    if any(s.status == "failed" for s in found):
        items.append((FAILED, "failed"))
    if any(s.kind == "freeze" for s in found):
        items.append((FREEZE, "freeze (container paused)"))
    keys = "".join(f'<span class="key"><i style="background:{c}"></i>{escape(n)}</span>' for c, n in items)
    return f"<figcaption>{keys}</figcaption>"


def _lane(s: Span) -> str:
    if "->" in s.where:
        return "link"
    if "," in s.where:
        return "both"
    if s.where.startswith("every"):
        return "every"
    return "target" if s.where == "target" else "source"


def _fill(s: Span) -> str:
    if s.status == "failed":
        return FAILED
    if s.kind == "undo":
        return UNDO
    return COLOURS[_lane(s)]


def _unless_done(status: str) -> str:
    return "" if status == "done" else f" ({escape(status)})"


def _tip(s: Span, hosts: dict[str, str]) -> str:
    return f"{s.label} on {where(s, hosts)}: {s.start_ms:.0f} .. {s.end_ms:.0f} ms ({s.status})"


def _tick_step(end: float) -> float:
    """1, 2 or 5 times a power of ten: at most about 8 ticks over the axis."""
    raw = end / 8
    power = 10 ** len(str(int(raw))) / 10 if raw >= 1 else 1.0
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


# --- formatting -----------------------------------------------------------------------------------------


def where(s: Span, hosts: dict[str, str]) -> str:
    """The span's where, with "source" and "target" replaced by the hosts' names."""
    return re.sub(r"\b(source|target)\b", lambda m: hosts.get(m[1], m[1]), s.where)


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _anchor(mig_id: str) -> str:
    return "m-" + re.sub(r"[^A-Za-z0-9_-]", "_", mig_id)


def _outcome_class(outcome: str) -> str:
    return "ok" if outcome in GOOD else "running" if outcome == "running" else "bad"


STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1d232b;margin:24px auto;max-width:1040px;
padding:0 16px;background:#fff}
h1{font-size:21px;margin:0 0 12px}h2{font-size:17px;margin:0 0 4px}
section{border:1px solid #d8dde3;border-radius:6px;padding:14px 16px;margin:0 0 18px}
p.id{color:#5b6672;margin:0 0 8px;font-size:12px}
table{border-collapse:collapse;margin:6px 0 10px}
td,th{padding:3px 10px 3px 0;text-align:left;vertical-align:top}
table.facts th{font-weight:600;color:#3d4752;white-space:nowrap}
table.facts td{white-space:pre-wrap;word-break:break-word}
table.runs,table.spans{width:100%}
table.runs th,table.spans th{border-bottom:1px solid #aeb7c1;font-weight:600}
table.runs td,table.spans td{border-bottom:1px solid #eef0f3}
td.num{text-align:right;font-variant-numeric:tabular-nums;padding-right:18px}
tr.round td.span{padding-left:18px;color:#444e59}
tr.undo td{color:#8a4d00}
tr.freeze td{background:#fde8e8;font-weight:600;color:#8f1d1d}tr.freeze td:first-child{box-shadow:inset 3px 0 #d64545}
.ok{color:#1c7a43;font-weight:600}.bad{color:#b42525;font-weight:600}.running{color:#9a6700;font-weight:600}
h2 span{font-size:13px;margin-left:6px}
figure{margin:6px 0 4px;overflow-x:auto}
svg.plot{display:block;font-size:13px}
svg .grid{stroke:#e3e7eb;stroke-width:1}
svg .tick{fill:#5b6672;text-anchor:middle;font-size:12px}
svg .axis{fill:#5b6672;text-anchor:end;font-size:12px}
svg .label{fill:#1d232b}
svg .took{fill:#5b6672;font-size:12px}
svg .freeze{fill:#d64545;fill-opacity:.16;stroke:#d64545;stroke-width:1}
svg .freeze-label{fill:#a12a2a;font-weight:600;font-size:13px}
svg .bar.bad{stroke:#7a1212;stroke-width:1}
figcaption{font-size:13px;color:#3d4752;margin-top:2px}
.key{margin-right:14px;white-space:nowrap}
.key i{display:inline-block;width:11px;height:11px;margin-right:5px;vertical-align:-1px;border-radius:2px}
@media print{section{break-inside:avoid}}
"""
