"""load_aware through a real router process: two loopback engines whose /metrics the test
sets (tests/metrics_engine.py). A deep queue gets no traffic while the other engine is free;
an engine whose /metrics stops answering goes stale and loses its traffic within max_age and
an interval; when every reading is stale the router falls back to least_request; when every
engine is saturated a request waits in the router's queue until a scrape shows room; each
answer names its backend (x-routeyard-backend) and, with explain, the scores."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.harness import Router, start_router, wait_until
from tests.metrics_engine import MetricsEngine

MODEL = "chat-model"
INTERVAL, MAX_AGE = 0.05, 0.3
#: What a loaded shared machine may add to max_age + interval before routing has moved.
SLACK = 1.5


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Router, MetricsEngine,
                                                                         MetricsEngine]]:
    with MetricsEngine(MODEL) as a, MetricsEngine(MODEL) as b:
        text = f"""\
defaults:
  endpoints: [chat]
models:
  {MODEL}:
    policy: load_aware
    engine_metrics: {{interval: {int(INTERVAL * 1000)}ms, timeout: 100ms,
                     max_age: {int(MAX_AGE * 1000)}ms}}
    scoring: {{explain: true}}
    queue: {{size: 8, timeout: 30s}}
    backends:
      - {{url: "{a.url}", name: a}}
      - {{url: "{b.url}", name: b}}
"""
        router = start_router(tmp_path_factory.mktemp("engine-routing"), text)
        try:
            yield router, a, b
        finally:
            router.stop()


@pytest.fixture
def fresh(stack: tuple[Router, MetricsEngine, MetricsEngine]) -> tuple[Router, MetricsEngine,
                                                                        MetricsEngine]:
    """Both engines idle and answering, and the router's readings of them fresh."""
    router, a, b = stack
    for engine in (a, b):
        engine.hang.clear()
        engine.set()
    wait_for_readings(router, {"a": 0, "b": 0})
    return stack


def engine_loads(router: Router) -> dict[str, dict[str, Any] | None]:
    return {b["name"]: b["engine_load"] for b in router.backends(MODEL)}


def wait_for_readings(router: Router, waiting: dict[str, int]) -> None:
    """Until the router's fresh reading of each named backend shows ``waiting``."""
    def shown() -> bool:
        loads = engine_loads(router)
        return all(loads[n] is not None and loads[n].get("waiting") == w  # type: ignore[union-attr]
                   and loads[n]["age_s"] < MAX_AGE for n, w in waiting.items())  # type: ignore[index]
    wait_until(shown, 10, f"the router reads waiting={waiting}")


def chat(router: Router) -> httpx.Response:
    response = router.client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hello"}]})
    assert response.status_code == 200, response.text
    return response


def test_a_deep_queue_gets_no_traffic_while_the_other_engine_is_free(fresh: Any) -> None:
    router, a, b = fresh
    a.set(running=4, waiting=50, kv_cache=0.7)
    wait_for_readings(router, {"a": 50, "b": 0})
    before = (a.chats, b.chats)
    picked = [chat(router) for _ in range(40)]
    assert (a.chats - before[0], b.chats - before[1]) == (0, 40)
    assert {r.headers["x-routeyard-backend"] for r in picked} == {"b"}
    scores = picked[0].headers["x-routeyard-scores"]
    assert scores.startswith("b total=") and scores.endswith("; a saturated"), scores
    assert a.url.split("//")[1] not in str(picked[0].headers)  # names, never addresses


def test_an_engine_whose_metrics_stop_answering_loses_its_traffic(fresh: Any) -> None:
    router, _, b = fresh
    assert {chat(router).headers["x-routeyard-backend"] for _ in range(6)} == {"a", "b"}
    b.hang.set()
    hung = time.monotonic()
    wait_until(lambda: "b stale" in chat(router).headers["x-routeyard-scores"],
               MAX_AGE + INTERVAL + SLACK, "b's reading goes stale")
    moved = time.monotonic() - hung
    assert moved <= MAX_AGE + INTERVAL + SLACK
    before = b.chats
    assert {chat(router).headers["x-routeyard-backend"] for _ in range(10)} == {"a"}
    assert b.chats == before
    (view,) = [v for v in router.backends(MODEL) if v["name"] == "b"]
    assert view["engine_load"]["age_s"] > MAX_AGE and view["engine_load"]["error"]
    assert view["state"] == "healthy"  # a scrape that fails is not a health check
    b.hang.clear()
    wait_for_readings(router, {"b": 0})
    assert "b" in {chat(router).headers["x-routeyard-backend"] for _ in range(6)}


def test_when_every_reading_is_stale_least_request_routes(fresh: Any) -> None:
    router, a, b = fresh
    a.hang.set()
    b.hang.set()
    wait_until(lambda: chat(router).headers["x-routeyard-scores"]
               == "every reading stale: least_request", MAX_AGE + INTERVAL + SLACK,
               "both readings go stale")
    before = (a.chats, b.chats)
    names = [chat(router).headers["x-routeyard-backend"] for _ in range(10)]
    assert set(names) == {"a", "b"}
    assert a.chats - before[0] + b.chats - before[1] == 10


def test_when_every_engine_is_saturated_a_request_waits_until_a_scrape_shows_room(
        fresh: Any) -> None:
    router, a, b = fresh
    a.set(waiting=50)
    b.set(kv_cache=0.97)
    wait_for_readings(router, {"a": 50, "b": 0})
    wait_until(lambda: engine_loads(router)["b"]["kv_cache_usage"] == 0.97,  # type: ignore[index]
               10, "the router reads b's KV cache full")
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(chat, router)
        wait_until(lambda: router._get("/admin/backends")[MODEL]["queued"] == 1, 10,
                   "the request waits in the router's queue")
        assert not pending.done()
        b.set(kv_cache=0.2)
        answer = pending.result(timeout=10)
    assert answer.headers["x-routeyard-backend"] == "b"


def test_cache_aware_keeps_each_system_prompt_on_one_backend(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """Six tenants with their own long system prompts through a cache_aware router: the
    answers of a tenant all name one backend, the tenants use both backends, and the
    prefix index's size is exported."""
    with MetricsEngine(MODEL) as a, MetricsEngine(MODEL) as b:
        text = f"""\
defaults:
  endpoints: [chat]
models:
  {MODEL}:
    policy: cache_aware
    engine_metrics: {{interval: 50ms, max_age: 2s}}
    prefix: {{chars: 2048, block_chars: 64}}
    backends:
      - {{url: "{a.url}", name: a}}
      - {{url: "{b.url}", name: b}}
"""
        router = start_router(tmp_path_factory.mktemp("cache-aware"), text)
        try:
            wait_until(lambda: all(load is not None for load in engine_loads(router).values()),
                       10, "the router reads both engines")
            homes: dict[int, set[str]] = {}
            for turn in range(4):
                for tenant in range(6):
                    system = f"You are assistant {tenant} of tenant {tenant}. " * 20
                    response = router.client.post("/v1/chat/completions", json={
                        "model": MODEL, "messages": [
                            {"role": "system", "content": system},
                            {"role": "user", "content": f"question {turn}"}]})
                    assert response.status_code == 200, response.text
                    homes.setdefault(tenant, set()).add(response.headers["x-routeyard-backend"])
            assert all(len(names) == 1 for names in homes.values()), homes
            assert set().union(*homes.values()) == {"a", "b"}, homes
            blocks = router.scrape()[("routeyard_prefix_index_blocks", (("model", MODEL),))]
            assert blocks > 0
        finally:
            router.stop()
