"""A small vLLM-compatible engine for tests and the demo; see ``app`` for the knobs.

``create_app`` and ``run`` are loaded on first use (PEP 562), so the engine's helper
modules (``formats``, ``tokens``...) import without the app.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.fake_engine.app import create_app, run

__all__ = ["create_app", "run"]

#: Exported name → the module that defines it.
_EXPORTS = {"create_app": "router.fake_engine.app", "run": "router.fake_engine.app"}


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
