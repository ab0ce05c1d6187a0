"""The OpenAI Files and Batch API on top of the router (see docs/batch.md).

Wiring: ``service = BatchService(config)``; ``register(app, service, tenant_of)``;
``await service.start(dispatcher)`` at server start and ``await service.close()`` at
stop; ``run_worker(config, dispatcher)`` for a worker-only process.

The names below are loaded on first use (PEP 562): ``router.batch.config``, which the
routes file's ``batch:`` block needs, comes without SQLAlchemy, obstore or Sanic.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.batch.api import register
    from router.batch.config import BatchConfig, StorageConfig
    from router.batch.dispatch import Dispatcher
    from router.batch.service import BatchService
    from router.batch.worker import run_worker

__all__ = ["BatchConfig", "BatchService", "Dispatcher", "StorageConfig", "register",
           "run_worker"]

#: Exported name → the module that defines it.
_EXPORTS = {
    "BatchConfig": "router.batch.config",
    "BatchService": "router.batch.service",
    "Dispatcher": "router.batch.dispatch",
    "StorageConfig": "router.batch.config",
    "register": "router.batch.api",
    "run_worker": "router.batch.worker",
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
