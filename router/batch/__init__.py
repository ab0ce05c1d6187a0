"""The OpenAI Files and Batch API on top of the router (see docs/batch.md).

Wiring: ``service = BatchService(config)``; ``register(app, service, tenant_of)``;
``await service.start(dispatcher)`` at server start and ``await service.close()`` at
stop; ``run_worker(config, dispatcher)`` for a worker-only process.
"""

from router.batch.api import register
from router.batch.config import BatchConfig, StorageConfig
from router.batch.dispatch import Dispatcher
from router.batch.service import BatchService
from router.batch.worker import run_worker

__all__ = ["BatchConfig", "BatchService", "Dispatcher", "StorageConfig", "register",
           "run_worker"]
