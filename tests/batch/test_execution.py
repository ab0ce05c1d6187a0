"""Running batches: retries, permanent errors, cancel, expiry, adaptive concurrency."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from router.batch import BatchConfig, BatchService
from router.batch.limiter import AdaptiveLimit
from tests.batch.conftest import (
    FAST,
    Server,
    chat_line,
    engine_requests,
    finished,
    jsonl,
    lines_of,
    read_lines,
    submit,
    wait_batch,
)
from tests.batch.dispatcher import EngineDispatcher, build
from tests.harness import wait_until

Make = Callable[..., Awaitable[tuple[BatchService, EngineDispatcher]]]


def _submit_http(server: Server, lines: list[Any], tenant: str = "A") -> str:
    client = server.client(tenant)
    made = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(input_file_id=made.id, endpoint="/v1/chat/completions",
                                 completion_window="24h").id


@pytest.fixture
def flaky(batch_engines: dict[str, str]) -> Iterator[str]:
    url = batch_engines["flaky"]
    httpx.post(f"{url}/_fake/reset")
    yield url
    httpx.post(f"{url}/_fake/reset")


def test_transient_errors_are_retried(local_server: Server, flaky: str) -> None:
    httpx.post(f"{flaky}/_fake/inject", json={"status": 503, "count": 2})
    batch_id = _submit_http(local_server, [chat_line("retry-1", model="flaky-model")])
    done = wait_batch(local_server.client(), batch_id)
    assert done.status == "completed" and done.request_counts.completed == 1
    assert len(engine_requests(flaky, "retry-1")) == 3
    [line] = read_lines(local_server.client(), done.output_file_id)
    assert line["response"]["status_code"] == 200


def test_exhausted_and_permanent_failures_go_to_the_error_file(
        local_server: Server, flaky: str, batch_engines: dict[str, str]) -> None:
    httpx.post(f"{flaky}/_fake/inject", json={"status": 429, "count": 100})
    lines = [chat_line("perm-ok"),
             chat_line("perm-400", max_tokens=-1),  # the engine answers 400
             chat_line("perm-429", model="flaky-model")]
    client = local_server.client()
    done = wait_batch(client, _submit_http(local_server, lines))
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 2)
    assert [x["custom_id"] for x in read_lines(client, done.output_file_id)] == ["perm-ok"]
    errors = {x["custom_id"]: x for x in read_lines(client, done.error_file_id)}
    assert errors["perm-400"]["response"]["status_code"] == 400
    assert errors["perm-400"]["response"]["body"]["error"]["type"] == "BadRequestError"
    assert errors["perm-429"]["response"]["status_code"] == 429
    assert len(engine_requests(flaky, "perm-429")) == 4  # max_attempts
    assert len(engine_requests(batch_engines["generate"], "perm-400")) == 1  # not retried


def test_cancel_stops_dispatching_and_keeps_partial_results(local_server: Server,
                                                           batch_engines: dict[str, str]
                                                           ) -> None:
    client = local_server.client()
    lines = [chat_line(f"cancel-{i}", model="slow-model") for i in range(24)]
    batch_id = _submit_http(local_server, lines)
    wait_batch(client, batch_id, until=("in_progress",))
    running = wait_until(  # counts advance while it runs
        lambda: (b := client.batches.retrieve(batch_id)).request_counts.completed >= 2 and b,
        10, "two lines completed", interval=0.05)
    assert running.status == "in_progress" and running.usage.total_tokens > 0
    cancelling = client.batches.cancel(batch_id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    assert client.batches.cancel(batch_id).status in ("cancelling", "cancelled")  # idempotent
    done = wait_batch(client, batch_id)
    assert done.status == "cancelled" and done.cancelled_at
    output = read_lines(client, done.output_file_id)
    errors = read_lines(client, done.error_file_id)
    assert len(output) == done.request_counts.completed >= 2
    assert all(x["error"]["code"] == "batch_cancelled" for x in errors)
    ids = Counter(x["custom_id"] for x in output + errors)
    assert ids == Counter(line["custom_id"] for line in lines)  # each exactly once
    sent = len(engine_requests(batch_engines["slow"], "cancel-"))
    assert sent == len(output) < 24
    with pytest.raises(openai.ConflictError, match="can no longer"):
        client.batches.cancel(wait_batch(client, _submit_http(local_server,
                                                              [chat_line("c-done")])).id)


# in-process services -------------------------------------------------------------------


@pytest.fixture
async def make_service(tmp_path: Path, batch_engines: dict[str, str]) -> AsyncIterator[Make]:
    made: list[tuple[BatchService, EngineDispatcher]] = []

    async def make(**overrides: Any) -> tuple[BatchService, EngineDispatcher]:
        config = BatchConfig.model_validate({
            "database_url": f"sqlite+aiosqlite:///{tmp_path}/db{len(made)}.db",
            "storage": {"url": str(tmp_path / "files")}, "workers": 1, **FAST, **overrides})
        dispatcher = build(batch_engines)
        service = BatchService(config)
        await service.start(dispatcher)
        made.append((service, dispatcher))
        return service, dispatcher

    yield make
    for service, dispatcher in made:
        await service.close(grace=5)
        await dispatcher.aclose()


async def test_expiry_keeps_partial_results(make_service: Make) -> None:
    service, dispatcher = await make_service(completion_window=2, max_concurrency=2,
                                             initial_concurrency=2)
    lines = [chat_line(f"exp-{i}", model="slow-model") for i in range(20)]
    batch_id = await submit(service, lines)
    done = await finished(service, batch_id)
    assert done["status"] == "expired" and done["expired_at"] >= done["expires_at"]
    assert done["expires_at"] == done["created_at"] + 2
    output = await lines_of(service, done["output_file_id"])
    errors = await lines_of(service, done["error_file_id"])
    assert 0 < len(output) == done["request_counts"]["completed"] < 20
    assert {x["error"]["code"] for x in errors} == {"batch_expired"}
    assert sorted(x["custom_id"] for x in output + errors) == sorted(x["custom_id"]
                                                                     for x in lines)
    assert sum(dispatcher.sent.values()) == len(output)


async def test_online_pressure_holds_batches_at_minimum(make_service: Make) -> None:
    service, dispatcher = await make_service(initial_concurrency=4)
    dispatcher.level = 1.0
    done = await finished(service, await submit(service, [chat_line(f"p1-{i}")
                                                          for i in range(12)]))
    assert done["status"] == "completed" and dispatcher.max_in_flight == 1
    dispatcher.level, dispatcher.max_in_flight = 0.0, 0
    done = await finished(service, await submit(service, [chat_line(f"p0-{i}")
                                                          for i in range(12)]))
    assert done["status"] == "completed" and dispatcher.max_in_flight >= 3


async def test_overload_answers_halve_concurrency(make_service: Make, flaky: str) -> None:
    service, dispatcher = await make_service(initial_concurrency=8, max_concurrency=8,
                                             max_attempts=6)
    httpx.post(f"{flaky}/_fake/inject", json={"status": 429, "count": 8})
    lines = [chat_line(f"aimd-{i}", model="flaky-model") for i in range(16)]
    done = await finished(service, await submit(service, lines))
    assert done["status"] == "completed" and done["request_counts"]["completed"] == 16
    assert dispatcher.statuses[429] == 8


def test_adaptive_limit_arithmetic() -> None:
    limit = AdaptiveLimit(minimum=1, initial=8, maximum=16, pressure_high=0.8)
    assert limit.allowed(0.0) == 8 and limit.allowed(0.5) == 4 and limit.allowed(0.9) == 1
    limit.on_overload()
    assert limit.allowed(0.0) == 4
    for _ in range(5):
        limit.on_success()  # +1/limit each: about +1 per window
    assert limit.allowed(0.0) == 5
    for _ in range(10):
        limit.on_overload()
    assert limit.allowed(0.0) == 1


# what the metrics and the logs see ---------------------------------------------------


async def test_line_counts_and_state_changes_are_visible(
        make_service: Make, flaky: str, caplog: pytest.LogCaptureFixture) -> None:
    """The process's line counts (what ``routeyard_batch_lines_total`` and
    ``routeyard_batch_lines_in_flight`` export) and an INFO line per state change."""
    service, _dispatcher = await make_service()
    assert service.lines is not None and service.lines.take() == (0, 0, 0)
    httpx.post(f"{flaky}/_fake/inject", json={"status": 503, "count": 2})
    lines = [chat_line("seen-ok"), chat_line("seen-400", max_tokens=-1),
             chat_line("seen-retried", model="flaky-model")]
    with caplog.at_level("INFO", logger="routeyard.batch"):
        batch_id = await submit(service, lines)
        done = await finished(service, batch_id)
    assert done["status"] == "completed"
    assert service.lines.take() == (2, 1, 2)  # completed, failed, retried (two 503s)
    assert service.lines.take() == (0, 0, 0)  # taken once
    assert service.lines.in_flight == 0
    said = [r.getMessage() for r in caplog.records
            if r.levelname == "INFO" and batch_id in r.getMessage()]
    assert said == [
        f"batch {batch_id}: validating (created for /v1/chat/completions, no key, input "
        f"{done['input_file_id']})",
        f"batch {batch_id}: in_progress (3 requests)",
        f"batch {batch_id}: finalizing (2 completed, 1 failed of 3)",
        f"batch {batch_id}: completed (2 completed, 1 failed of 3)",
    ]
    counts, oldest = await service.gauges()
    assert counts == {"completed": 1} and oldest == 0


async def test_gauges_show_the_oldest_batch_no_worker_holds(tmp_path: Path) -> None:
    """A batch no worker takes (none runs in this process: ``routeyard batch-worker``
    would) is queued: its age is what ``routeyard_batch_oldest_queued_age_seconds`` shows."""
    now = [1_000_000.0]
    config = BatchConfig.model_validate({
        "database_url": f"sqlite+aiosqlite:///{tmp_path}/db.db",
        "storage": {"url": str(tmp_path / "files")}, **FAST})
    service = BatchService(config, clock=lambda: now[0])
    await service.start()  # no dispatcher: no workers here
    try:
        assert service.lines is None
        await submit(service, [chat_line("queued-1")])
        now[0] += 30
        await submit(service, [chat_line("queued-2")])
        now[0] += 12
        assert await service.gauges() == ({"validating": 2}, 42.0)
    finally:
        await service.close()
