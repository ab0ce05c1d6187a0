"""The batch tables' migrations, on SQLite and PostgreSQL: 0001 → head keeps the rows,
adds ``batches.key_id`` (NULL for batches from before it), and ends at ``schema.py``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import insert, inspect, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from router.batch import BatchConfig
from router.batch.db import create_engine, migrate
from router.batch.schema import batches, metadata
from tests.batch.conftest import PG_URL

VERSION_TABLE = "routeyard_batch_version"  # migrations/env.py (not importable outside Alembic)

LEGACY = {"id": "batch_legacy", "tenant": "acme", "endpoint": "/v1/chat/completions",
          "input_file_id": "file-x", "completion_window": "24h", "status": "in_progress",
          "created_at": 1, "expires_at": 2}


async def _upgrade(engine: AsyncEngine, revision: str, schema: str | None) -> None:
    def upgrade(connection: Connection) -> None:
        cfg = Config()
        cfg.set_main_option("script_location", "router.batch:migrations")
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)

    async with engine.begin() as conn:
        if schema:
            await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        await conn.run_sync(upgrade)


def _differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return list(compare_metadata(context, metadata))


async def _check(config: BatchConfig) -> None:
    engine = create_engine(config)
    try:
        await _upgrade(engine, "0001", config.database_schema)
        async with engine.begin() as conn:
            columns = await conn.run_sync(
                lambda c: {col["name"] for col in inspect(c).get_columns("batches")})
            assert "key_id" not in columns
            await conn.execute(text(
                "INSERT INTO batches (id, tenant, endpoint, input_file_id, completion_window,"
                " status, created_at, expires_at) VALUES (:id, :tenant, :endpoint,"
                " :input_file_id, :completion_window, :status, :created_at, :expires_at)"),
                LEGACY)
        await migrate(engine, config.database_schema)
        await migrate(engine, config.database_schema)  # a second start: nothing to do
        async with engine.begin() as conn:
            row = (await conn.execute(select(batches).where(
                batches.c.id == "batch_legacy"))).one()
            assert row.key_id is None and row.tenant == "acme" and row.total == 0
            await conn.execute(insert(batches).values(
                {**LEGACY, "id": "batch_new", "key_id": "acme-basic", "total": 0,
                 "completed": 0, "failed": 0, "lease_epoch": 0}))
            assert (await conn.execute(select(batches.c.key_id).where(
                batches.c.id == "batch_new"))).scalar() == "acme-basic"
            version = (await conn.execute(text(
                f"SELECT version_num FROM {VERSION_TABLE}"))).scalar()
            assert version == "0002"
            assert await conn.run_sync(_differences) == []
    finally:
        await engine.dispose()


async def test_sqlite_migrates_to_the_schema(tmp_path: Path) -> None:
    await _check(BatchConfig(database_url=f"sqlite+aiosqlite:///{tmp_path}/m.db"))


async def test_postgresql_migrates_to_the_schema(pg_schemas: Callable[[], str]) -> None:
    await _check(BatchConfig(database_url=PG_URL, database_schema=pg_schemas()))

