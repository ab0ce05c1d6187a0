"""Backpressure and availability: the bounded queue and its 429, no healthy backend (503),
and ``/ready``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.fleet.conftest import (
    CHAT,
    Engine,
    Fleet,
    Outcome,
    chat_body,
    model,
    routes,
    send,
)
from tests.harness import Router, eventually, free_port, start_router, wait_until


@pytest.fixture(scope="module")
def bp_router(fleet_procs: Fleet,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Router, int]]:
    dead_port = free_port()  # nothing listens here until a test starts an engine on it
    queued = model(fleet_procs[0], queue={"size": 2, "timeout": "500ms"})
    queued["backends"][0]["max_in_flight"] = 1
    text = routes({
        "queued": queued,
        "alive": model(fleet_procs[1]),
        "dead": model(f"http://127.0.0.1:{dead_port}"),
    })
    with start_router(tmp_path_factory.mktemp("backpressure"), text) as router:
        yield router, dead_port


async def test_queue_then_429_with_retry_after(bp_router: tuple[Router, int], fleet: Fleet) -> None:
    router, _ = bp_router
    engine = fleet[0]
    router.wait_healthy_backends("queued")

    async with httpx.AsyncClient(base_url=router.url, timeout=30) as admin, \
            httpx.AsyncClient(timeout=30) as client:
        async def cluster(key: str, value: int) -> bool:
            return (await admin.get("/admin/backends")).json()["queued"][key] == value

        async def timed(headers: dict[str, str] | None = None) -> tuple[float, Outcome]:
            start = time.monotonic()
            outcome = await send(client, router.url, chat_body("queued"), headers)
            return time.monotonic() - start, outcome

        # A slow request holds the only slot for 1.5 s.
        holder = asyncio.create_task(timed({"x-fake-latency-ms": "1500"}))
        await eventually(lambda: cluster("in_flight", 1), 5, "the slow request holds the slot")
        queued = [asyncio.create_task(timed()) for _ in range(2)]
        await eventually(lambda: cluster("queued", 2), 5, "two requests wait in the queue")

        # One more than the queue holds: 429 at once (the queued ones are still waiting).
        sdk = openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.RateLimitError) as caught:
            await sdk.chat.completions.create(model="queued", max_tokens=4,
                                              messages=[{"role": "user", "content": "hi"}])
        assert not any(t.done() for t in queued)  # answered before their 500 ms ran out
        assert caught.value.status_code == 429
        assert caught.value.code == "rate_limit_exceeded"
        assert int(caught.value.response.headers["retry-after"]) >= 1
        await sdk.close()

        # The queued ones give up after the queue timeout, while the slot is still held.
        for elapsed, outcome in await asyncio.gather(*queued):
            assert outcome.status == 429, outcome
            error = outcome.json()["error"]
            assert (error["code"], error["type"]) == ("rate_limit_exceeded", "rate_limit_error")
            assert int(outcome.headers["retry-after"]) >= 1
            assert 0.45 <= elapsed < 1.4, elapsed
        assert not holder.done()
        elapsed, outcome = await holder
        assert outcome.ok, outcome
        assert engine.count() == 1  # the rejected ones never reached the backend

        # A queued request that gets the slot within the timeout succeeds.
        holder = asyncio.create_task(timed({"x-fake-latency-ms": "250"}))
        await eventually(lambda: cluster("in_flight", 1), 5, "the slow request holds the slot")
        waiter = asyncio.create_task(timed())
        await eventually(lambda: cluster("queued", 1), 5, "the request waits in the queue")
        (_, first), (elapsed, second) = await asyncio.gather(holder, waiter)
        assert first.ok and second.ok, (first, second)
        assert engine.count() == 3


def test_no_healthy_backend_is_503_and_ready_names_the_model(
        bp_router: tuple[Router, int], fleet: Fleet, logs: Path) -> None:
    router, dead_port = bp_router
    router.wait_healthy_backends("alive")

    def not_ready() -> dict | None:
        r = router.client.get("/ready")
        return r.json() if r.status_code == 503 else None

    body = wait_until(not_ready, 5, "/ready turns 503 once the dead backend fails its checks")
    assert body["models_without_backend"] == ["dead"]

    r = router.client.post(CHAT, json=chat_body("dead"))
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "no_healthy_backend"
    assert int(r.headers["retry-after"]) >= 1
    assert router.client.post(CHAT, json=chat_body("alive")).status_code == 200

    # A backend comes up on that address: the health checks let it in, /ready turns 200.
    revived = Engine("revived", logs, port=dead_port)
    revived.start()
    try:
        wait_until(lambda: router.client.get("/ready").status_code == 200, 5,
                   "/ready turns 200 when every model has a backend")
        assert router.client.get("/ready").json() == {"status": "ready"}
        r = router.client.post(CHAT, json=chat_body("dead"))
        assert r.status_code == 200, r.text
        assert revived.count() == 1
    finally:
        revived.kill()


async def test_a_slot_freed_by_a_request_from_before_a_reload_goes_to_the_queue(
        launch_router, fleet: Fleet) -> None:
    """The slot a request of the previous config frees must wake a request that waits
    under the new config, not leave it waiting until its queue timeout."""
    def text(weight: int) -> str:
        spec = model(fleet[0], queue={"size": 2, "timeout": "6s"})
        spec["backends"][0].update(max_in_flight=1, weight=weight)
        return routes({"queued": spec})

    router = launch_router(text(1))
    async with httpx.AsyncClient(timeout=30) as client:
        async def timed(headers: dict[str, str] | None = None) -> tuple[float, Outcome]:
            outcome = await send(client, router.url, chat_body("queued"), headers)
            return time.monotonic(), outcome

        holder = asyncio.create_task(timed({"x-fake-latency-ms": "2500"}))
        await asyncio.to_thread(wait_until, lambda: fleet[0].count() == 1, 5, "slot taken")
        await asyncio.to_thread(router.rewrite, text(2))  # any change: a new snapshot
        assert not holder.done()
        waiter = asyncio.create_task(timed())
        (freed_at, first), (served_at, second) = await asyncio.gather(holder, waiter)
    assert first.ok and second.ok, (first, second)
    assert served_at - freed_at < 1.0, f"waited {served_at - freed_at:.1f}s after the slot freed"
