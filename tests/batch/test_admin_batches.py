"""The batches in progress as ``/admin/status`` lists them (``BatchService.active_batches``
and ``router.admin.batches_view``), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from router.admin import batches_view
from router.batch import BatchService
from router.batch.config import BatchConfig
from router.status_page import render
from tests.batch.conftest import PG_URL, chat_line, submit


@pytest.fixture(params=["sqlite", "postgresql"])
async def service(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BatchService]:
    """A service without workers: its batches stay in progress."""
    if request.param == "sqlite":
        db: dict[str, Any] = {"database_url": f"sqlite+aiosqlite:///{tmp_path}/batch.db"}
    else:
        schemas: Callable[[], str] = request.getfixturevalue("pg_schemas")
        db = {"database_url": PG_URL, "database_schema": schemas()}
    made = BatchService(BatchConfig.model_validate(
        {**db, "storage": {"url": str(tmp_path / "files")}, "workers": 0}))
    await made.start()
    yield made
    await made.close()


async def test_batches_in_progress_are_listed_with_their_counts(service: BatchService) -> None:
    first = await submit(service, [chat_line("a"), chat_line("b")], tenant="A")
    second = await submit(service, [chat_line("c")], tenant="B")
    done = await submit(service, [chat_line("d")], tenant="A")
    await service.cancel_batch("A", done)
    assert await service.db.transition(done, 0, ("cancelling",),
                                       {"status": "cancelled", "cancelled_at": service.now()})
    listed = await batches_view(service)
    assert isinstance(listed, list)
    assert [(b["id"], b["tenant"]) for b in listed] == [(first, "A"), (second, "B")]
    assert listed[0]["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    assert listed[0]["status"] == "validating"
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", listed[0]["created_at"])
    page = render({}, {}, listed, "now")
    assert first in page and second in page and done not in page


async def test_a_database_that_does_not_answer_in_time_is_named(
        service: BatchService, monkeypatch: pytest.MonkeyPatch) -> None:
    async def stuck(limit: int) -> list[Any]:
        await asyncio.sleep(60)
        return []

    monkeypatch.setattr(service, "active_batches", stuck)
    monkeypatch.setattr("router.admin.BATCHES_TIMEOUT", 0.05)
    assert await batches_view(service) == "the batch database did not answer within 0.05 s"
