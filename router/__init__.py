"""routeyard: a declarative, YAML-driven router for OpenAI-compatible LLM serving.

The names below are loaded on first use (PEP 562), so ``import router.catalog`` or
``import router.config`` does not pull in the server (Sanic), the batch storage
(SQLAlchemy, obstore), Redis, OpenTelemetry or Prometheus.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from router import lazy

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


__getattr__, __dir__ = lazy.exports(__name__, _EXPORTS, __all__)
