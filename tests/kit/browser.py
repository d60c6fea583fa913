"""A real headless browser for the HTML reports: Debian's chromium (apt, installed by `make host`) driven by
Playwright, which never downloads a browser of its own here. A visit records what an operator's browser
would complain about: console errors, uncaught page errors, and every request, failed or not."""

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from playwright.sync_api import Browser, Page, sync_playwright


@dataclass
class Visit:
    page: Page
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


@contextmanager
def chromium() -> Iterator[Browser]:
    path = shutil.which("chromium")
    assert path, "no chromium on this machine: `make host` installs it (scripts/bootstrap-host.sh)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path)  # Playwright adds --no-sandbox (root here)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def visit(browser: Browser, path: Path, width: int = 1100) -> Iterator[Visit]:
    """Open `path` from disk, as an operator double-clicking the file would."""
    context = browser.new_context(viewport={"width": width, "height": 800})
    page = context.new_page()
    seen = Visit(page)
    page.on("console", lambda m: seen.console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: seen.console_errors.append(str(e)))
    page.on("request", lambda r: seen.requests.append(r.url))
    page.on("requestfailed", lambda r: seen.failed.append(f"{r.url}: {r.failure}"))
    try:
        page.goto(path.resolve().as_uri(), wait_until="load")
        page.evaluate("1")  # a round trip: every event the load raised has been delivered by now
        yield seen
    finally:
        context.close()
