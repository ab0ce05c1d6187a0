"""``routeyard compat``: does a router answer exactly as the engine behind it does?

The suite of its task (``requests``) goes once straight to the engine and once through the
router; ``compare`` normalises and diffs each pair of answers; ``report`` prints a table
and, on request, writes Markdown. The exit status is 0 only when no probe differs.

The names below are loaded on first use (PEP 562): ``compare``, ``report`` and
``requests`` import without httpx.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from router import lazy

if TYPE_CHECKING:
    from router.compat.compare import Answer, Outcome
    from router.compat.requests import TASKS
    from router.compat.runner import compare_all, parse_header, run

__all__ = ["TASKS", "Answer", "Outcome", "compare_all", "parse_header", "run"]

#: Exported name → the module that defines it.
_EXPORTS = {
    "TASKS": "router.compat.requests",
    "Answer": "router.compat.compare",
    "Outcome": "router.compat.compare",
    "compare_all": "router.compat.runner",
    "parse_header": "router.compat.runner",
    "run": "router.compat.runner",
}


__getattr__, __dir__ = lazy.exports(__name__, _EXPORTS, __all__)
