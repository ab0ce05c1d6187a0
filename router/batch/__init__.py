"""The OpenAI Files and Batch API on top of the router (see docs/batch.md).

Wiring: ``service = BatchService(config)``; ``register(app, service, tenant_of)``;
``await service.start(dispatcher)`` at server start and ``await service.close()`` at
stop; ``run_worker(config, dispatcher)`` for a worker-only process.

The names below are loaded on first use (PEP 562): ``router.batch.config``, which the
routes file's ``batch:`` block needs, comes without SQLAlchemy, obstore or Sanic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from router import lazy

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


__getattr__, __dir__ = lazy.exports(__name__, _EXPORTS, __all__)
