"""routeyard: a declarative, YAML-driven router for OpenAI-compatible LLM serving.

The names below are loaded on first use (PEP 562), so ``import router.catalog`` or
``import router.config`` does not pull in the server (Sanic), the batch storage
(SQLAlchemy, obstore), Redis, OpenTelemetry or Prometheus.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.app import create_app
    from router.config import ConfigError, RoutesConfig, load_file, parse
    from router.settings import Settings

__all__ = ["ConfigError", "RoutesConfig", "Settings", "create_app", "load_file", "parse"]
__version__ = "0.1.0"

#: Exported name → the module that defines it.
_EXPORTS = {
    "ConfigError": "router.config",
    "RoutesConfig": "router.config",
    "Settings": "router.settings",
    "create_app": "router.app",
    "load_file": "router.config",
    "parse": "router.config",
}


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
