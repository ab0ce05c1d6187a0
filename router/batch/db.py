"""Metadata store: SQLAlchemy 2 async over SQLite (aiosqlite) or PostgreSQL (asyncpg).

Every write a worker makes on a claimed batch carries the claim's ``lease_epoch`` in its
WHERE clause; a claim bumps the epoch, so a worker that lost its lease cannot record a
result or move a status (``LeaseLost``). Claims use ``FOR UPDATE SKIP LOCKED`` on
PostgreSQL; on SQLite every transaction is ``BEGIN IMMEDIATE``, which serialises writers
(also across processes sharing the file), so the same statements are safe there.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete, event, func, insert, or_, select, text, update
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from router.batch.config import BatchConfig
from router.batch.errors import Conflict, LeaseLost
from router.batch.schema import AnyRow, batches, files, results

#: Statuses a worker still has to act on.
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
_MIGRATION_LOCK = 0x7274_7962_6174  # pg_advisory_xact_lock key: replicas migrate one at a time


@dataclass(frozen=True, slots=True)
class Result:
    """One finished line: its JSONL output or error line, and the usage it adds."""

    line: int
    ok: bool
    data: bytes
    usage: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)


def create_engine(config: BatchConfig) -> AsyncEngine:
    """The async engine for ``config.database_url``; no connection is made yet."""
    url = make_url(config.database_url)
    backend = url.get_backend_name()
    if backend == "sqlite":
        if url.drivername != "sqlite+aiosqlite":
            url = url.set(drivername="sqlite+aiosqlite")
        if not url.database or url.database == ":memory:":
            raise ValueError("database_url: SQLite needs a file, e.g. sqlite+aiosqlite:///batch.db")
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30})
        _sqlite_immediate(engine)
        return engine
    if backend == "postgresql":
        url = url.set(drivername="postgresql+asyncpg")
        args: dict[str, Any] = {}
        if config.database_schema:
            args["server_settings"] = {"search_path": config.database_schema}
        return create_async_engine(url, connect_args=args, pool_size=config.database_pool_size,
                                   pool_pre_ping=True)
    raise ValueError(f"database_url {config.database_url!r}: use sqlite+aiosqlite:// or "
                     "postgresql+asyncpg://")


def _sqlite_immediate(engine: AsyncEngine) -> None:
    """WAL, a busy timeout, and BEGIN IMMEDIATE: SQLite's stand-in for row locks."""

    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
        cursor = dbapi_connection.cursor()
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=30000"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


async def migrate(engine: AsyncEngine, schema: str | None = None) -> None:
    """Bring the tables to the newest migration (Alembic, in this event loop)."""

    def upgrade(connection: Connection) -> None:
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", "router.batch:migrations")
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")

    async with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                               {"key": _MIGRATION_LOCK})
            if schema:
                await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        await conn.run_sync(upgrade)


def _page(table: Any, tenant: str, after_seq: int | None, descending: bool) -> Any:
    query = select(table).where(table.c.tenant == tenant)
    if after_seq is not None:
        query = query.where(table.c.seq < after_seq if descending else table.c.seq > after_seq)
    return query.order_by(table.c.seq.desc() if descending else table.c.seq)


class MetaStore:
    """All SQL of the Files and Batch API. Tenants are strings (``""`` when auth is off)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def close(self) -> None:
        await self.engine.dispose()

    # files ---------------------------------------------------------------------------

    async def insert_file(self, values: dict[str, Any]) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(insert(files).values(**values))

    async def get_file(self, tenant: str, file_id: str, now: int) -> AnyRow | None:
        query = select(files).where(files.c.id == file_id, files.c.tenant == tenant,
                                    or_(files.c.expires_at.is_(None), files.c.expires_at > now))
        async with self.engine.begin() as conn:
            return (await conn.execute(query)).first()

    async def list_files(self, tenant: str, purpose: str | None, limit: int, descending: bool,
                         after: str | None, now: int) -> tuple[list[AnyRow], bool] | None:
        """A page and whether more follow; None when ``after`` names no file of the tenant."""
        async with self.engine.begin() as conn:
            after_seq = await self._seq_of(conn, files, tenant, after)
            if after is not None and after_seq is None:
                return None
            query = _page(files, tenant, after_seq, descending).where(
                or_(files.c.expires_at.is_(None), files.c.expires_at > now))
            if purpose:
                query = query.where(files.c.purpose == purpose)
            rows = list((await conn.execute(query.limit(limit + 1))).all())
        return rows[:limit], len(rows) > limit

    async def delete_file(self, tenant: str, file_id: str) -> AnyRow | None:
        """Delete the row (the caller deletes the object); refuse while a batch reads it."""
        async with self.engine.begin() as conn:
            row = (await conn.execute(select(files).where(
                files.c.id == file_id, files.c.tenant == tenant))).first()
            if row is None:
                return None
            busy = (await conn.execute(select(batches.c.id).where(
                batches.c.input_file_id == file_id, batches.c.status.in_(ACTIVE)).limit(1))).first()
            if busy is not None:
                raise Conflict(f"File {file_id} is the input of batch {busy.id}, which is still "
                               "running; cancel the batch or wait for it to end.",
                               param="file_id")
            await conn.execute(delete(files).where(files.c.id == file_id))
            return row

    async def take_expired_files(self, now: int, limit: int = 500) -> list[str]:
        """Forget expired files not read by a running batch; returns their object keys."""
        in_use = select(batches.c.input_file_id).where(batches.c.status.in_(ACTIVE))
        async with self.engine.begin() as conn:
            rows = (await conn.execute(select(files.c.id, files.c.object_key).where(
                files.c.expires_at <= now, files.c.id.not_in(in_use)).limit(limit))).all()
            if rows:
                await conn.execute(delete(files).where(files.c.id.in_([r.id for r in rows])))
        return [r.object_key for r in rows]

    # batches (API side) --------------------------------------------------------------

    async def insert_batch(self, values: dict[str, Any]) -> AnyRow:
        """The new batch's row as inserted (a worker may claim it at once: the creator's
        answer is this row, not a later read)."""
        async with self.engine.begin() as conn:
            result = await conn.execute(insert(batches).values(**values).returning(batches))
            row: AnyRow = result.one()
            return row

    async def get_batch(self, batch_id: str, tenant: str | None = None) -> AnyRow | None:
        query = select(batches).where(batches.c.id == batch_id)
        if tenant is not None:
            query = query.where(batches.c.tenant == tenant)
        async with self.engine.begin() as conn:
            return (await conn.execute(query)).first()

    async def list_batches(self, tenant: str, limit: int,
                           after: str | None) -> tuple[list[AnyRow], bool] | None:
        async with self.engine.begin() as conn:
            after_seq = await self._seq_of(conn, batches, tenant, after)
            if after is not None and after_seq is None:
                return None
            query = _page(batches, tenant, after_seq, descending=True).limit(limit + 1)
            rows = list((await conn.execute(query)).all())
        return rows[:limit], len(rows) > limit

    async def active_batches(self, limit: int) -> list[AnyRow]:
        """The oldest ``limit`` batches of every tenant that have not ended (the admin
        view)."""
        query = (select(batches).where(batches.c.status.in_(ACTIVE))
                 .order_by(batches.c.seq).limit(limit))
        async with self.engine.begin() as conn:
            return list((await conn.execute(query)).all())

    async def request_cancel(self, tenant: str, batch_id: str, now: int) -> bool:
        """validating/in_progress → cancelling; False if the batch was in another status."""
        async with self.engine.begin() as conn:
            result = await conn.execute(update(batches).where(
                batches.c.id == batch_id, batches.c.tenant == tenant,
                batches.c.status.in_(("validating", "in_progress")),
            ).values(status="cancelling", cancelling_at=now))
            return result.rowcount == 1

    @staticmethod
    async def _seq_of(conn: Any, table: Any, tenant: str, object_id: str | None) -> int | None:
        if object_id is None:
            return None
        seq: int | None = (await conn.execute(select(table.c.seq).where(
            table.c.id == object_id, table.c.tenant == tenant))).scalar()
        return seq

    # batches (worker side) -----------------------------------------------------------

    async def claim(self, owner: str, now: float, lease: float) -> AnyRow | None:
        """Take the oldest active batch whose lease is free or lapsed; bumps its epoch."""
        free = or_(batches.c.lease_until.is_(None), batches.c.lease_until < now)
        pick = (select(batches.c.id).where(batches.c.status.in_(ACTIVE), free)
                .order_by(batches.c.seq).limit(1).with_for_update(skip_locked=True))
        async with self.engine.begin() as conn:
            batch_id = (await conn.execute(pick)).scalar()
            if batch_id is None:
                return None
            await conn.execute(update(batches).where(batches.c.id == batch_id).values(
                lease_owner=owner, lease_until=now + lease,
                lease_epoch=batches.c.lease_epoch + 1))
            return (await conn.execute(select(batches).where(batches.c.id == batch_id))).first()

    async def batch_gauges(self, now: float) -> tuple[dict[str, int], int | None]:
        """Batches by status, and the ``created_at`` of the oldest active batch whose lease
        is free or lapsed (what ``claim`` would take next), or None."""
        free = or_(batches.c.lease_until.is_(None), batches.c.lease_until < now)
        by_status = select(batches.c.status, func.count()).group_by(batches.c.status)
        oldest = select(func.min(batches.c.created_at)).where(
            batches.c.status.in_(ACTIVE), free)
        async with self.engine.begin() as conn:
            counts = {status: n for status, n in (await conn.execute(by_status)).all()}
            first = (await conn.execute(oldest)).scalar()
        return counts, first

    async def renew(self, batch_id: str, epoch: int, until: float) -> str:
        """Extend the lease; returns the status (the API may have set ``cancelling``)."""
        async with self.engine.begin() as conn:
            done = await conn.execute(update(batches).where(
                batches.c.id == batch_id, batches.c.lease_epoch == epoch).values(lease_until=until))
            if done.rowcount != 1:
                raise LeaseLost(batch_id)
            status: str = (await conn.execute(select(batches.c.status).where(
                batches.c.id == batch_id))).scalar_one()
            return status

    async def release(self, batch_id: str, epoch: int) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(update(batches).where(
                batches.c.id == batch_id, batches.c.lease_epoch == epoch,
            ).values(lease_owner=None, lease_until=None))

    async def transition(self, batch_id: str, epoch: int, from_: Sequence[str],
                         values: dict[str, Any]) -> bool:
        """Move a claimed batch on; False if its status is no longer in ``from_``."""
        async with self.engine.begin() as conn:
            done = await conn.execute(update(batches).where(
                batches.c.id == batch_id, batches.c.lease_epoch == epoch,
                batches.c.status.in_(from_)).values(**values))
            if done.rowcount == 1:
                return True
            await self._check_epoch(conn, batch_id, epoch)
            return False

    async def done_lines(self, batch_id: str) -> set[int]:
        async with self.engine.begin() as conn:
            rows = await conn.execute(select(results.c.line).where(results.c.batch_id == batch_id))
            return {line for (line,) in rows}

    async def record(self, batch_id: str, epoch: int, items: Sequence[Result]) -> str:
        """Checkpoint finished lines and advance the counters, in one transaction;
        returns the status (so a cancel is seen at the next checkpoint)."""
        ok = sum(1 for r in items if r.ok)
        sums = [sum(r.usage[i] for r in items) for i in range(5)]
        c = batches.c
        async with self.engine.begin() as conn:
            done = await conn.execute(update(batches).where(
                c.id == batch_id, c.lease_epoch == epoch,
            ).values(completed=c.completed + ok, failed=c.failed + len(items) - ok,
                     input_tokens=c.input_tokens + sums[0], cached_tokens=c.cached_tokens + sums[1],
                     output_tokens=c.output_tokens + sums[2],
                     reasoning_tokens=c.reasoning_tokens + sums[3],
                     total_tokens=c.total_tokens + sums[4]).returning(c.status))
            status = done.scalar()
            if status is None:
                raise LeaseLost(batch_id)
            await conn.execute(insert(results), [
                {"batch_id": batch_id, "line": r.line, "ok": r.ok, "data": r.data} for r in items])
            return str(status)

    async def iter_results(self, batch_id: str, ok: bool | None = None,
                           page: int = 1000) -> AsyncIterator[tuple[int, bool, bytes]]:
        """Checkpointed lines in input order, a page per query (memory stays flat)."""
        last = -1
        while True:
            query = select(results.c.line, results.c.ok, results.c.data).where(
                results.c.batch_id == batch_id, results.c.line > last)
            if ok is not None:
                query = query.where(results.c.ok == ok)
            async with self.engine.begin() as conn:
                rows = (await conn.execute(query.order_by(results.c.line).limit(page))).all()
            for row in rows:
                yield row.line, row.ok, bytes(row.data)
            if len(rows) < page:
                return
            last = rows[-1].line

    async def finish(self, batch_id: str, epoch: int, from_: Sequence[str],
                     values: dict[str, Any], new_files: Sequence[dict[str, Any]]) -> bool:
        """The terminal move: register output files, set the status, drop the checkpoint."""
        async with self.engine.begin() as conn:
            done = await conn.execute(update(batches).where(
                batches.c.id == batch_id, batches.c.lease_epoch == epoch,
                batches.c.status.in_(from_)).values(lease_owner=None, lease_until=None, **values))
            if done.rowcount != 1:
                await self._check_epoch(conn, batch_id, epoch)
                return False
            for row in new_files:
                exists = (await conn.execute(select(files.c.seq).where(
                    files.c.id == row["id"]))).first()
                if exists is None:
                    await conn.execute(insert(files).values(**row))
            await conn.execute(delete(results).where(results.c.batch_id == batch_id))
            return True

    @staticmethod
    async def _check_epoch(conn: Any, batch_id: str, epoch: int) -> None:
        current = (await conn.execute(select(batches.c.lease_epoch).where(
            batches.c.id == batch_id))).scalar()
        if current != epoch:
            raise LeaseLost(batch_id)

