"""Package imports stay cheap: the config and catalog modules load no server stack.

Each check runs in a fresh interpreter, since this test process has imported everything.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: What the batch store, shared limits and telemetry bring in.
BACKENDS = ("sqlalchemy", "obstore", "redis", "opentelemetry", "prometheus_client")
#: ... and the server.
HEAVY = ("sanic", "httptools", *BACKENDS)


def loaded_after(code: str) -> set[str]:
    """Top-level packages in ``sys.modules`` after running ``code`` in a new interpreter."""
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted({m.partition('.')[0] " \
        "for m in sys.modules})))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True)
    return set(json.loads(out.stdout.splitlines()[-1]))


@pytest.mark.parametrize("module", ["router.catalog", "router.config"])
def test_config_and_catalog_load_no_server_stack(module: str) -> None:
    loaded = loaded_after(f"import {module}")
    assert "router" in loaded
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))


@pytest.mark.parametrize("code", [
    "import router.fake_engine",
    "from router.fake_engine import create_app",
])
def test_fake_engine_loads_sanic_but_no_storage_or_telemetry(code: str) -> None:
    loaded = loaded_after(code)
    assert loaded.isdisjoint(BACKENDS), sorted(loaded & set(BACKENDS))


def test_the_lazy_names_still_resolve() -> None:
    loaded = loaded_after(
        "import router, router.batch, router.tenants, router.compat\n"
        "for pkg in (router, router.batch, router.tenants, router.compat):\n"
        "    for name in pkg.__all__:\n"
        "        assert getattr(pkg, name) is not None, (pkg.__name__, name)\n"
        "    assert set(pkg.__all__) <= set(dir(pkg))\n"
        "try:\n"
        "    router.nothing_here\n"
        "except AttributeError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('router.nothing_here resolved')\n"
    )
    assert "sanic" in loaded  # router.create_app is the server
