"""A small vLLM-compatible engine for tests and the demo; see ``app`` for the knobs.

``create_app`` and ``run`` are loaded on first use (PEP 562), so the engine's helper
modules (``formats``, ``tokens``...) import without the app.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from router import lazy

if TYPE_CHECKING:
    from router.fake_engine.app import create_app, run

__all__ = ["create_app", "run"]

#: Exported name → the module that defines it.
_EXPORTS = {"create_app": "router.fake_engine.app", "run": "router.fake_engine.app"}


__getattr__, __dir__ = lazy.exports(__name__, _EXPORTS, __all__)
