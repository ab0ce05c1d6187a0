"""docs/supported-apis.md's table of the router's own routes lists exactly the routes
``create_app`` registers besides the proxied ones (with metrics and ``batch:`` on)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sanic import Sanic

from router.app import create_app
from router.settings import Settings
from router.supported_apis import DOC

ROUTES = """\
models:
  m:
    backends: [{url: "http://a:8000"}]
    endpoints: [chat]
batch:
  database_url: sqlite+aiosqlite:///batch.db
  storage: {url: files}
"""


def documented() -> set[tuple[str, str]]:
    text = DOC.read_text(encoding="utf-8")
    block = text.split("<!-- router-routes:begin -->")[1].split("<!-- router-routes:end -->")[0]
    return set(re.findall(r"^\| (GET|POST|DELETE|PUT|PATCH) \| `([^`]+)` \|", block, re.M))


def test_every_route_of_the_router_itself_is_documented(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Sanic, "test_mode", True)  # another app of the same name is fine
    config = tmp_path / "routes.yaml"
    config.write_text(ROUTES)
    app = create_app(Settings(config=str(config), metrics=True))
    own = {
        (method, "/" + re.sub(r"<(\w+)(:\w+)?>", r"{\1}", route.path))
        for route in app.router.routes if not route.name.split(".")[-1].startswith("proxy")
        for method in route.methods
    }
    assert own == documented()
