"""How each policy spreads requests over three fake engines (each its own process).

Counts come from each engine's own request log, so they are what the engines received.
One router serves a model per policy; the tests run one at a time, so in-flight counts
(shared by endpoint) belong to the test that runs.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import defaultdict
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.fleet.conftest import (
    Fleet,
    assert_no_failures,
    chat_body,
    hammer,
    model,
    routes,
    send,
)
from tests.harness import Router, start_router

PREFIX_CHARS = 200
LOAD_FACTOR = 1.25


@pytest.fixture(scope="module")
def policy_router(fleet_procs: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    e = fleet_procs.engines
    text = routes({
        "rr-model": model(*e),
        "weighted-model": model(*e, weights=[1, 2, 3]),
        "lr-model": model(e[0], e[1], fleet_procs.slow, policy="least_request"),
        "session-model": model(*e, policy="session"),
        "prefix-model": model(*e, policy="prefix",
                              prefix={"chars": PREFIX_CHARS, "load_factor": LOAD_FACTOR}),
    })
    with start_router(tmp_path_factory.mktemp("policies"), text) as router:
        yield router


@pytest.fixture
def router(policy_router: Router, fleet: Fleet) -> Router:
    """The policies router, with every engine up in its view."""
    policy_router.wait_healthy_backends("rr-model", "lr-model")
    return policy_router


def engine_of(fleet: Fleet, value_of: Callable[[dict], str]) -> dict[str, set[str]]:
    """For each value of a request attribute: the engines that received it."""
    where: dict[str, set[str]] = defaultdict(set)
    for engine in fleet:
        for entry in engine.requests():
            where[value_of(entry)].add(engine.name)
    return where


def test_round_robin_is_an_exact_rotation(router: Router, fleet: Fleet) -> None:
    for i in range(30):
        r = router.client.post("/v1/chat/completions", json=chat_body("rr-model"),
                               headers={"x-request-id": f"rr-{i}"})
        assert r.status_code == 200, r.text
    assert fleet.counts() == [10, 10, 10]
    owner = {entry["request_id"]: engine.name for engine in fleet for entry in engine.requests()}
    order = [owner[f"rr-{i}"] for i in range(30)]
    assert len(set(order[:3])) == 3, order
    assert order == order[:3] * 10, order


async def test_weighted_round_robin_follows_the_weights(router: Router, fleet: Fleet) -> None:
    outcomes = await hammer(router.url, "weighted-model", 600, 8)
    assert_no_failures(outcomes, 600)
    counts = fleet.counts()
    assert sum(counts) == 600
    for got, weight in zip(counts, [1, 2, 3], strict=True):
        assert abs(got - 100 * weight) <= 12, counts  # smooth WRR is exact; allow 2 %


async def test_least_request_sends_less_to_a_slow_backend(router: Router, fleet: Fleet) -> None:
    fast = fleet.engines[:2]
    fleet.slow.reset()
    outcomes = await hammer(router.url, "lr-model", 200, 9)
    assert_no_failures(outcomes, 200)
    fast_counts = fleet.counts(fast)
    slow_count = fleet.slow.count()
    assert sum(fast_counts) + slow_count == 200
    # Round robin would give the slow one a third (67); least_request keeps its in-flight
    # share even, so it answers only as many as its 200 ms latency lets through.
    assert 3 * slow_count < min(fast_counts), (fast_counts, slow_count)


def _shuffled(n: int, round_: int) -> list[int]:
    """0..n-1 in a different order each round, so no rotation can fake stickiness."""
    return random.Random(round_).sample(range(n), n)


def test_session_header_sticks_to_one_backend(router: Router, fleet: Fleet) -> None:
    for round_ in range(3):
        for i in _shuffled(30, round_):
            r = router.client.post("/v1/chat/completions",
                                   json=chat_body("session-model", f"turn {round_}"),
                                   headers={"x-session-id": f"session-{i}"})
            assert r.status_code == 200, r.text
    where = engine_of(fleet, lambda e: e["headers"]["x-session-id"])
    assert len(where) == 30
    assert all(len(engines) == 1 for engines in where.values()), where
    used = set().union(*where.values())
    assert used == {"e0", "e1", "e2"}, where  # 30 sessions spread over all three


def test_session_user_field_sticks_to_one_backend(router: Router, fleet: Fleet) -> None:
    for round_ in range(3):
        for i in _shuffled(30, round_):
            r = router.client.post(
                "/v1/chat/completions",
                json=chat_body("session-model", f"turn {round_}", user=f"user-{i}"))
            assert r.status_code == 200, r.text
    where = engine_of(fleet, lambda e: e["json"]["user"])
    assert len(where) == 30
    assert all(len(engines) == 1 for engines in where.values()), where
    assert set().union(*where.values()) == {"e0", "e1", "e2"}, where


def _prefixed(system: str, question: str) -> dict:
    body = chat_body("prefix-model", question)
    body["messages"].insert(0, {"role": "system", "content": system})
    return body


SYSTEM = "You are a careful assistant for the fleet tests. " * 8  # > PREFIX_CHARS


def test_prefix_shared_prefix_lands_on_one_backend(router: Router, fleet: Fleet) -> None:
    for i in range(20):
        r = router.client.post("/v1/chat/completions",
                               json=_prefixed(SYSTEM, f"distinct question {i}"))
        assert r.status_code == 200, r.text
    counts = fleet.counts()
    assert sorted(counts) == [0, 0, 20], counts


def test_prefix_distinct_prefixes_spread_and_each_stays(router: Router, fleet: Fleet) -> None:
    def system(i: int) -> str:
        return f"Tenant {i} system prompt. " + SYSTEM

    for round_ in range(2):
        for i in _shuffled(30, round_):
            r = router.client.post("/v1/chat/completions",
                                   json=_prefixed(system(i), f"question {round_}"))
            assert r.status_code == 200, r.text
    where = engine_of(fleet, lambda e: e["json"]["messages"][0]["content"])
    assert len(where) == 30
    assert all(len(engines) == 1 for engines in where.values()), where
    assert set().union(*where.values()) == {"e0", "e1", "e2"}, fleet.counts()


async def test_prefix_bounded_load_spills_a_hot_prefix(router: Router, fleet: Fleet) -> None:
    """One hot prefix at concurrency 12: the ring's owner takes most, but never more in
    flight than load_factor x the mean + 1; the rest spill to the other replicas."""
    concurrency, total = 12, 72
    r = router.client.post("/v1/chat/completions", json=_prefixed(SYSTEM, "alone"))
    assert r.status_code == 200, r.text
    (owner,) = [e for e in fleet if e.count() == 1]  # the prefix's place on the ring
    for engine in fleet:
        engine.reset()
    peak: dict[str, int] = defaultdict(int)
    running = asyncio.Event()

    async def watch(client: httpx.AsyncClient) -> None:
        while not running.is_set():
            r = await client.get(f"{router.url}/admin/backends")
            for entry in r.json()["prefix-model"]["backends"]:
                peak[entry["url"]] = max(peak[entry["url"]], entry["in_flight"])
            await asyncio.sleep(0.005)

    async def load(client: httpx.AsyncClient) -> list:
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int):
            async with sem:
                return await send(client, router.url, _prefixed(SYSTEM, f"hot {i}"),
                                  {"x-fake-latency-ms": "150"})

        try:
            return await asyncio.gather(*(one(i) for i in range(total)))
        finally:
            running.set()

    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        outcomes, _ = await asyncio.gather(load(client), watch(client))
    assert_no_failures(outcomes, total)

    bound = LOAD_FACTOR * concurrency / 3 + 1
    assert max(peak.values()) <= bound, dict(peak)
    counts = {e.name: e.count() for e in fleet}
    assert sum(counts.values()) == total
    assert counts[owner.name] >= total / 3, counts  # the prefix's owner still takes a full share
    assert counts[owner.name] < 0.6 * total, counts  # but the bound spilled the excess
    # The owner ran at its bound: without the rule it would hold all 12 at once.
    assert peak[owner.url] >= math.ceil(LOAD_FACTOR * concurrency / 3) - 1, dict(peak)
    assert {e["state"] for e in router.backends("prefix-model")} == {"healthy"}
