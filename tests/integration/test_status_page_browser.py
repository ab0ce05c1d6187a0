"""``/admin/status`` in a real browser: headless Chromium loads the page from a running
router, the test reads the rendered DOM, and a screenshot is written to
``build/admin-status.png``.

Needs Debian's ``chromium`` (``.ci/run`` installs it); outside CI a machine without it
skips, in CI (``CI=true``) the test runs and fails without it."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.harness import Router, wait_until

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium")
SCREENSHOT = ROOT / "build" / "admin-status.png"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None and os.environ.get("CI") != "true",
    reason="needs Debian's chromium (apt-get install -y chromium; .ci/run installs it)")


class Tables(HTMLParser):
    """The text of each cell of each ``<table id=...>``, row by row."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.title = ""
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._table = dict(attrs).get("id") or ""
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None
        elif tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._in_title:
            self.title += data


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None, "chromium is not installed (apt-get install -y chromium)"
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=90, check=False)


def test_the_status_page_renders_in_chromium(
        engines: dict[str, str], launch_router: Callable[..., Router], tmp_path: Path,
        fake_only: None) -> None:
    router = launch_router(f"""\
defaults:
  health_checks: {{interval: 200ms}}
models:
  chat-model:
    backends: [{{url: "{engines['generate']}"}}]
    endpoints: [chat]
    policy: least_request
  misnamed:
    backends: [{{url: "{engines['generate']}"}}]
    endpoints: [chat]
    backend_model: no-such-model
""")
    wait_until(lambda: router.backends("misnamed")[0]["state"] == "unhealthy", 5,
               "the misnamed model's backend marked down")
    url = f"{router.url}/admin/status"
    dumped = chromium("--dump-dom", url, profile=tmp_path / "profile")
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    page = Tables()
    page.feed(dumped.stdout)
    assert page.title == "routeyard status"
    models = {row[0]: row for row in page.tables["models"][1:]}
    assert models["chat-model"][1:4] == ["chat", "least_request", "1 of 1"]
    assert models["misnamed"][3] == "0 of 1"
    backends = {row[0]: row for row in page.tables["backends"][1:]}
    assert backends["chat-model"][1].startswith(f"0: {engines['generate']}")
    assert backends["chat-model"][2] == "healthy"
    assert backends["misnamed"][2] == "unhealthy"
    assert backends["chat-model"][4] == "—"  # least_request reads no engine metrics
    assert backends["misnamed"][6].startswith("model no-such-model not served (engine serves:")
    assert page.tables["reloads"][1][1] == "start"

    SCREENSHOT.parent.mkdir(exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    shot = chromium(f"--screenshot={SCREENSHOT}", "--window-size=1280,900",
                    "--hide-scrollbars", url, profile=tmp_path / "profile")
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
