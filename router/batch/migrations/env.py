"""Alembic environment for the batch tables.

The server runs migrations itself (``router.batch.db.migrate``): it opens an async
connection and hands Alembic its sync facade through ``config.attributes["connection"]``,
so no second event loop is needed. For ``alembic revision`` and friends from a shell, set
``ROUTEYARD_BATCH_DATABASE_URL``; this file then connects with the async recipe.
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from router.batch.schema import metadata

VERSION_TABLE = "routeyard_batch_version"


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata,
                      version_table=VERSION_TABLE, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


async def _run_from_url(url: str) -> None:
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(_run)
    await engine.dispose()


connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    url = os.environ.get("ROUTEYARD_BATCH_DATABASE_URL")
    if not url:
        raise RuntimeError("set ROUTEYARD_BATCH_DATABASE_URL to run batch migrations by hand")
    asyncio.run(_run_from_url(url))
