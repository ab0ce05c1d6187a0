"""Crash safety: kill -9 of a worker mid-batch, and two workers sharing one database."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from router.batch import BatchConfig, BatchService
from tests.batch.conftest import (
    FAST,
    PG_URL,
    chat_line,
    engine_requests,
    finished,
    lines_of,
    submit,
    write_spec,
)
from tests.harness import Process, eventually, log_line, python_m, start_all, stop_all


@pytest.fixture(params=["sqlite", "postgres"])
def db_config(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "sqlite":
        return {"database_url": f"sqlite+aiosqlite:///{tmp_path}/batch.db"}
    schemas: Callable[[], str] = request.getfixturevalue("pg_schemas")
    return {"database_url": PG_URL, "database_schema": schemas()}


@pytest.fixture
async def control(tmp_path: Path, db_config: dict[str, Any]) -> AsyncIterator[BatchService]:
    """A service without workers, on the database and files the workers use."""
    config = {**db_config, "storage": {"url": str(tmp_path / "files")}, "workers": 1,
              "lease": 1.5, "initial_concurrency": 4, "max_concurrency": 4, **FAST}
    service = BatchService(BatchConfig.model_validate(config))
    await service.start()
    yield service
    await service.close()


def worker(tmp: Path, service: BatchService, engines: dict[str, str], name: str,
           workers: int = 1) -> Process:
    """A batch worker process on the service's database and files (not started): ready
    once it logs that it runs."""
    config = service.config.model_dump(mode="json")
    config["storage"]["secret_access_key"] = config["storage"]["session_token"] = None
    spec = write_spec(tmp / f"worker-{name}.json", config, engines, workers)
    return Process(python_m("tests.batch.server", "worker", str(spec)),
                   tmp / f"worker-{name}.log", ready=log_line("batch worker running"),
                   name=f"batch worker {name}")


async def start(*workers: Process) -> None:
    """Start them off the event loop (the control service keeps running on it)."""
    await asyncio.to_thread(start_all, workers)


async def test_kill_9_mid_batch_then_resume(control: BatchService, tmp_path: Path,
                                            batch_engines: dict[str, str]) -> None:
    tag = f"kill-{secrets.token_hex(3)}-"
    lines = [chat_line(f"{tag}{i}", model="slow-model") for i in range(28)]
    batch_id = await submit(control, lines)
    first = worker(tmp_path, control, batch_engines, "first")
    try:
        await start(first)

        async def eight_done() -> bool:
            batch = await control.get_batch(None, batch_id)
            return batch["request_counts"]["completed"] >= 8

        await eventually(eight_done, 20, "the first worker completes 8 lines", interval=0.05)
    finally:
        first.kill()  # kill -9, mid-batch
    committed = {f"{tag}{line - 1}" for line in await control.db.done_lines(batch_id)}
    killed_at = time.time()
    second = worker(tmp_path, control, batch_engines, "second")
    try:
        await start(second)
        done = await finished(control, batch_id, timeout=30)
    finally:
        second.stop()
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 28, "completed": 28, "failed": 0}
    output = await lines_of(control, done["output_file_id"])
    assert [x["custom_id"] for x in output] == [x["custom_id"] for x in lines]
    assert done["error_file_id"] is None
    sent = engine_requests(batch_engines["slow"], tag)
    counts = Counter(e["json"]["messages"][0]["content"] for e in sent)
    assert set(counts) == {x["custom_id"] for x in lines}  # none skipped
    assert all(counts[c] == 1 for c in committed)  # checkpointed lines never re-sent
    resent = [c for c, n in counts.items() if n > 1]
    # Only lines in flight (4) or answered but not yet committed (4) at the kill.
    assert len(resent) <= 8 and all(counts[c] == 2 for c in resent)
    resumed = [e["time"] for e in sent if e["time"] > killed_at]
    assert resumed and min(resumed) - killed_at >= 0.7  # waited for the lease to lapse


@pytest.mark.parametrize("db_config", ["postgres"], indirect=True)
async def test_two_workers_never_run_the_same_line(control: BatchService, tmp_path: Path,
                                                   batch_engines: dict[str, str]) -> None:
    tag = f"pair-{secrets.token_hex(3)}-"
    workers = [worker(tmp_path, control, batch_engines, f"w{i}", workers=2) for i in range(2)]
    try:
        await start(*workers)  # both up before any batch exists, so both get some
        batches = {}
        for b in range(4):
            lines = [chat_line(f"{tag}{b}-{i}", model="slow-model") for i in range(10)]
            batches[await submit(control, lines)] = lines
        results = [await finished(control, batch_id, timeout=30) for batch_id in batches]
    finally:
        stop_all(workers)
    for done in results:
        assert done["status"] == "completed" and done["request_counts"]["completed"] == 10
        output = await lines_of(control, done["output_file_id"])
        assert [x["custom_id"] for x in output] == \
            [x["custom_id"] for x in batches[done["id"]]]
    sent = engine_requests(batch_engines["slow"], tag)
    counts = Counter(e["json"]["messages"][0]["content"] for e in sent)
    assert len(counts) == 40 and set(counts.values()) == {1}
    assert len({e["headers"]["x-batch-worker"] for e in sent}) == 2  # both took part
