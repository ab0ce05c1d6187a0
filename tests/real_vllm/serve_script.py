"""``scripts/real_vllm/serve.py`` (it is a script, not a package module) loaded once for
the real-tier tests: its engine specs, venv and start helpers."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from tests.harness import ROOT


def _load() -> ModuleType:
    path = ROOT / "scripts" / "real_vllm" / "serve.py"
    spec = importlib.util.spec_from_file_location("routeyard_real_vllm_serve", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


serve = sys.modules.get("routeyard_real_vllm_serve") or _load()
