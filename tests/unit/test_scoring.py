"""router/scoring.py and the scored balancer (balancer.Scored): scorers, saturation, the
router's credit between scrapes, staleness, tie rotation, and the queue a saturated model
waits in. A fake clock; no sockets, no sleeps."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from router import config, snapshot
from router.balancer import PreferredOnRing, Scored, make_balancer
from router.cluster import AdapterCluster, Cluster
from router.config import OutlierDetection
from router.discovery import Resolver
from router.endpoint import Endpoint, Member
from router.engine_load import EngineLoad, EngineReading
from router.errors import QueueTimeout
from router.prefix_index import PrefixIndex, text_blocks
from router.scoring import Thresholds, Weights, kv_cache_score, saturated, spread
from tests.unit.fleet_core import eject, endpoints, model_config, registry


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def read(endpoint: Endpoint, clock: Clock, running: int = 0, waiting: int = 0,
         kv: float = 0.0) -> None:
    """A scrape of ``endpoint`` answered now, against its in-flight count now."""
    endpoint.load.update(EngineReading(running, waiting, kv), clock.now, 0.0,
                         endpoint.in_flight)


def named(eps: list[Endpoint], weights: list[int] | None = None) -> list[Member]:
    ws = weights or [1] * len(eps)
    return [Member(e, w, name=str(i)) for i, (e, w) in enumerate(zip(eps, ws, strict=True))]


def scored(eps: list[Endpoint], clock: Clock, policy: str = "load_aware",
           weights: list[int] | None = None, **spec: Any) -> Scored:
    balancer = make_balancer(model_config(policy=policy, **spec), named(eps, weights), clock)
    assert isinstance(balancer, Scored)
    return balancer


def take(balancer: Scored, n: int, key: str | None = None) -> Counter[str]:
    """``n`` picks, each counted in flight (as a lease would), by host."""
    got: Counter[str] = Counter()
    for _ in range(n):
        endpoint = balancer.pick(key, set())
        assert endpoint is not None
        endpoint.in_flight += 1
        got[endpoint.origin.host] += 1
    return got


# -- the scorers ---------------------------------------------------------------------------
def test_spread_is_one_for_the_least_zero_for_the_most_and_one_when_equal() -> None:
    assert spread(2, 2, 10) == 1.0
    assert spread(10, 2, 10) == 0.0
    assert spread(6, 2, 10) == 0.5
    assert spread(3, 3, 3) == 1.0


def test_kv_cache_score_is_the_free_share() -> None:
    assert kv_cache_score(0.25) == 0.75
    assert kv_cache_score(1.2) == 0.0 and kv_cache_score(-1.0) == 1.0


def test_saturation_is_the_engines_queue_or_kv_cache_at_a_threshold() -> None:
    limits = Thresholds(queue=5, kv_cache=0.9, max_age=0.5)
    load = EngineLoad()
    load.update(EngineReading(running=200, waiting=4, kv_cache=0.89), 0.0, 0.0, 0)
    assert not saturated(load, limits)
    load.update(EngineReading(running=0, waiting=5, kv_cache=0.0), 0.0, 0.0, 0)
    assert saturated(load, limits)
    load.update(EngineReading(running=0, waiting=0, kv_cache=0.9), 0.0, 0.0, 0)
    assert saturated(load, limits)


def test_preferred_on_ring_scores_one_candidate_and_follows_the_key() -> None:
    eps = endpoints(registry(), 4)
    scorer = PreferredOnRing(named(eps))
    first = scorer.scores("tenant-7 system prompt", eps)
    assert list(first.values()) == [1.0]
    (preferred,) = first
    assert scorer.scores("tenant-7 system prompt", eps) == {preferred: 1.0}
    others = [e for e in eps if e is not preferred]
    (second,) = scorer.scores("tenant-7 system prompt", others)
    assert second in others
    assert len({next(iter(scorer.scores(f"k{i}", eps))) for i in range(50)}) == 4


# -- load_aware ----------------------------------------------------------------------------
def test_a_deep_queue_gets_no_traffic_while_another_engine_is_free() -> None:
    clock = Clock()
    a, b = endpoints(registry(), 2)
    balancer = scored([a, b], clock)
    read(a, clock, running=8, waiting=40, kv=0.95)
    read(b, clock)
    assert take(balancer, 30) == {"e1": 30}


def test_between_scrapes_the_routers_own_dispatches_spread_the_load() -> None:
    # Without the credit, the one reading would send every request until the next scrape
    # to the engine that was idle at the scrape.
    clock = Clock()
    a, b = endpoints(registry(), 2)
    balancer = scored([a, b], clock, scoring={"weights": {"in_flight": 0, "kv_cache": 0}})
    read(a, clock, running=2)
    read(b, clock)
    assert take(balancer, 20) == {"e0": 9, "e1": 11}


def test_the_credit_is_net_of_completions() -> None:
    clock = Clock()
    a, b = endpoints(registry(), 2)
    a.in_flight = 4
    read(a, clock, running=4)  # the engine counts the 4 this router sent
    read(b, clock, running=2)
    balancer = scored([a, b], clock, scoring={"weights": {"in_flight": 0, "kv_cache": 0}})
    a.in_flight = 0  # all 4 finished since the scrape: a's queue is 0 now, b's 2
    assert take(balancer, 2) == {"e0": 2}


def test_kv_cache_use_decides_between_equal_queues() -> None:
    clock = Clock()
    a, b = endpoints(registry(), 2)
    read(a, clock, running=3, kv=0.8)
    read(b, clock, running=3, kv=0.2)
    balancer = scored([a, b], clock, scoring={"weights": {"in_flight": 0}})
    assert balancer.pick(None, set()) is b


def test_equal_scores_rotate_so_ties_spread() -> None:
    clock = Clock()
    eps = endpoints(registry(), 3)
    for e in eps:
        read(e, clock)
    balancer = scored(eps, clock)
    assert Counter(balancer.pick(None, set()).origin.host for _ in range(9)) == {  # type: ignore[union-attr]
        "e0": 3, "e1": 3, "e2": 3}


def test_a_saturated_engine_is_skipped_while_another_is_below_the_thresholds() -> None:
    clock = Clock()
    a, b = endpoints(registry(), 2)
    balancer = scored([a, b], clock, scoring={"saturation": {"queue": 3, "kv_cache": 0.5}})
    read(a, clock, running=1, waiting=3)  # at the queue threshold
    read(b, clock, running=50, waiting=2, kv=0.4)  # far busier, yet below both
    assert take(balancer, 5) == {"e1": 5}
    read(b, clock, kv=0.5)
    assert balancer.pick(None, set()) is None  # all saturated: the request waits


def test_a_stale_reading_counts_as_saturated() -> None:
    clock = Clock()
    a, b = endpoints(registry(), 2)
    balancer = scored([a, b], clock, engine_metrics={"max_age": "500ms"})
    read(a, clock)
    clock.now += 0.3
    read(b, clock, running=30)
    assert take(balancer, 3) == {"e0": 3}  # a is idle and 0.3 s old: fresh
    clock.now += 0.25  # a's reading is 0.55 s old now
    assert take(balancer, 3) == {"e1": 3}


def test_when_every_reading_is_stale_least_request_picks() -> None:
    clock = Clock()
    a, b, c = endpoints(registry(), 3)
    balancer = scored([a, b, c], clock)
    a.in_flight, b.in_flight, c.in_flight = 3, 1, 2
    assert balancer.pick(None, set()) is b  # never read: all stale
    for e in (a, b, c):
        read(e, clock)
    clock.now += 10
    assert balancer.pick(None, set()) is b


def test_stale_and_saturated_together_wait_rather_than_fall_back() -> None:
    clock = Clock()
    a, b = endpoints(registry(), 2)
    balancer = scored([a, b], clock)
    read(a, clock, waiting=20)
    assert balancer.pick(None, set()) is None  # b never read, a full


def test_down_full_and_tried_members_are_not_candidates() -> None:
    clock = Clock()
    a, b, c = endpoints(registry(), 3, max_in_flight=1)
    for e in (a, b, c):
        read(e, clock)
    balancer = scored([a, b, c], clock)
    eject(a)
    b.in_flight = 1
    assert {balancer.pick(None, {e for e in (a, b, c) if e is not c}) for _ in range(3)} == {c}
    assert balancer.pick(None, {c}) is None


def test_the_session_scorer_keeps_a_session_on_its_backend_until_it_is_busier() -> None:
    clock = Clock()
    eps = endpoints(registry(), 3)
    for e in eps:
        read(e, clock)
    balancer = scored(eps, clock, scoring={"weights": {"session": 3}})
    first = balancer.pick("user-42", set())
    assert all(balancer.pick("user-42", set()) is first for _ in range(5))
    read(first, clock, running=20)  # far busier: queue 0 and kv 0 against 2 + 2 + 1
    balancer = scored(eps, clock, scoring={"weights": {"session": 3, "in_flight": 0}})
    assert balancer.pick("user-42", set()) is first  # 3 + 0 + 2 = 5 > 0 + 2 + 2 = 4
    balancer = scored(eps, clock, scoring={"weights": {"session": 1, "in_flight": 0}})
    assert balancer.pick("user-42", set()) is not first


# -- cache_aware ---------------------------------------------------------------------------
def test_cache_aware_sends_a_prefix_to_its_backend_and_spills_when_it_is_loaded() -> None:
    clock = Clock()
    eps = endpoints(registry(), 4)
    for e in eps:
        read(e, clock)
    # the consistent-hash fallback (no index) at llm-d's weight: the load scorers outweigh it
    balancer = scored(eps, clock, policy="cache_aware", scoring={"weights": {"prefix": 3}})
    picks = take(balancer, 4, key="system: you are a tax assistant")
    assert len(picks) < 4  # the preferred backend took more than its share
    (_, count), *_ = picks.most_common()
    assert count >= 2
    # a hot prefix does not pile onto its home: with 20 more, every backend gets some
    assert len(take(balancer, 20, key="system: you are a tax assistant")) == 4


def test_cache_aware_without_a_prompt_is_load_aware() -> None:
    clock = Clock()
    a, b = endpoints(registry(), 2)
    read(a, clock, running=9)
    read(b, clock)
    balancer = scored([a, b], clock, policy="cache_aware")
    assert balancer.pick(None, set()) is b


def test_explain_lists_each_candidates_scores_and_why_the_others_are_out() -> None:
    clock = Clock()
    a, b, c = endpoints(registry(), 3)
    read(a, clock, running=4, kv=0.5)
    read(b, clock)
    read(c, clock, waiting=20)
    balancer = scored([a, b, c], clock, scoring={"explain": True})
    picked = balancer.pick(None, set())
    assert picked is b
    assert balancer.explained == (b, (
        "1 total=5.00 queue=1.00 kv_cache=1.00 in_flight=1.00 key=0.00; "
        "0 total=2.00 queue=0.00 kv_cache=0.50 in_flight=1.00 key=0.00; 2 saturated"))
    clock.now += 60
    balancer.pick(None, set())
    assert balancer.explained[1] == "every reading stale: least_request"


# -- the queue of a saturated model --------------------------------------------------------
async def test_all_saturated_waits_in_the_queue_and_a_scrape_showing_room_wakes_it() -> None:
    clock = Clock()
    a, b = endpoints(registry(), 2)
    config = model_config(policy="load_aware", queue={"size": 4, "timeout": "30s"})
    cluster = Cluster(config, named([a, b]), OutlierDetection())
    cluster.balancer = make_balancer(config, cluster.routable, clock)
    read(a, clock, waiting=20)
    read(b, clock, kv=0.95)
    waiting = asyncio.ensure_future(cluster.acquire(None, set()))
    await asyncio.sleep(0)
    assert not waiting.done() and len(cluster.waiters) == 1
    read(b, clock, kv=0.3)
    b.load_changed()  # what the scraper calls after each scrape
    assert await asyncio.wait_for(waiting, 5) is b
    assert b.in_flight == 1


async def test_all_saturated_with_a_full_queue_is_a_429() -> None:
    clock = Clock()
    (a,) = endpoints(registry(), 1)
    config = model_config(policy="load_aware", queue={"size": 0})
    cluster = Cluster(config, named([a]), OutlierDetection())
    cluster.balancer = make_balancer(config, cluster.routable, clock)
    read(a, clock, waiting=20)
    with pytest.raises(QueueTimeout, match="the queue is full"):
        await cluster.acquire(None, set())


async def test_a_lease_carries_the_backends_name_and_with_explain_its_scores() -> None:
    a, b = endpoints(registry(), 2)
    clock = Clock()
    config = model_config(policy="load_aware", scoring={"explain": True})
    cluster = Cluster(config, [Member(a, 1, name="left"), Member(b, 1, name="right")],
                      OutlierDetection())
    cluster.balancer = cluster.scored = make_balancer(  # type: ignore[assignment]
        config, cluster.routable, clock)
    read(a, clock, running=5)
    read(b, clock)
    lease = cluster.lease(None, set())
    async with lease as endpoint:
        assert endpoint is b
        (name, value), (scores, text) = lease.explain
        assert (name, value, scores) == (b"x-routeyard-backend", b"right", b"x-routeyard-scores")
        assert text.startswith(b"right total=")
    plain = Cluster(model_config(policy="round_robin"), named([a]), OutlierDetection())
    lease = plain.lease(None, set())
    async with lease:
        assert lease.explain == ()


class Index:
    """A KeyScorer standing in for a prefix-cache index: fixed values, and what it learned."""

    def __init__(self, values: dict[Endpoint, float]) -> None:
        self.values = values
        self.learned: list[tuple[str, Endpoint]] = []

    def scores(self, key: str, candidates: Any) -> dict[Endpoint, float]:
        return {e: v for e, v in self.values.items() if e in candidates}

    def picked(self, key: str, endpoint: Endpoint) -> None:
        self.learned.append((key, endpoint))


def test_any_key_scorer_fills_the_prefix_slot_and_learns_each_pick() -> None:
    clock = Clock()
    a, b, c = endpoints(registry(), 3)
    for e in (a, b, c):
        read(e, clock)
    index = Index({b: 0.5, c: 0.9})
    balancer = Scored(named([a, b, c]), Weights(2, 2, 1, 3), Thresholds(5, 0.9, 0.5), index,
                      clock=clock)
    assert balancer.pick("prompt", set()) is c
    assert balancer.pick(None, set()) is not None  # no key: nothing scored, nothing learned
    read(c, clock, running=10)  # c busier: 0 + 2 + 1 + 2.7 = 5.7 < 2 + 2 + 1 + 1.5 = 6.5
    assert balancer.pick("prompt", set()) is b
    assert index.learned == [("prompt", c), ("prompt", b)]


async def test_a_placed_lease_names_its_backend_without_someone_elses_scores() -> None:
    a, b = endpoints(registry(), 2)
    clock = Clock()
    config = model_config(policy="load_aware", scoring={"explain": True})
    cluster = Cluster(config, named([a, b]), OutlierDetection())
    cluster.balancer = cluster.scored = make_balancer(  # type: ignore[assignment]
        config, cluster.routable, clock)
    read(a, clock)
    read(b, clock, running=5)
    async with cluster.lease(None, set()) as endpoint:
        assert endpoint is a  # the balancer's pick: scores of a
    lease = cluster.lease(None, set(), prefer=a.key)
    async with lease as endpoint:
        assert endpoint is a
        assert lease.explain == ((b"x-routeyard-backend", b"0"),)


# -- cache_aware over the model's prefix index -----------------------------------------------

def indexed(eps: list[Endpoint], clock: Clock, index: PrefixIndex, **spec: Any) -> Scored:
    balancer = make_balancer(model_config(policy="cache_aware", prefix={"block_chars": 16},
                                          **spec), named(eps), clock, prefix_index=index)
    assert isinstance(balancer, Scored)
    return balancer


def prompt(tenant: int, turn: int) -> str:
    return f"tenant {tenant:03d} system: " + "rules " * 40 + f"user: question {turn}"


def test_cache_aware_sends_each_prompt_where_its_blocks_are() -> None:
    """Six tenants, each with its own long system prompt, whose first requests could only
    go to one backend (the others tried): every later request of a tenant goes where its
    blocks are, not where a hash of its prompt would (all engines idle)."""
    clock = Clock()
    eps = endpoints(registry(), 4)
    for e in eps:
        read(e, clock)
    index = PrefixIndex(10_000)
    balancer = indexed(eps, clock, index)
    for tenant in range(6):
        assert balancer.pick(prompt(tenant, 0), set(eps[:3])) is eps[3]
    for turn in range(1, 5):
        for tenant in range(6):
            assert balancer.pick(prompt(tenant, turn), set()) is eps[3], (tenant, turn)
    assert index.held_by("http://e3:8000") == len(index) > 0


def test_a_shared_prompt_spreads_under_bounded_load() -> None:
    """100 sessions of one system prompt, each held in flight: the backend with the
    blocks loses its preference once above load_factor times the mean, so all four serve
    (the prefix weight alone here: the load scorers would spread them too)."""
    clock = Clock()
    eps = endpoints(registry(), 4)
    for e in eps:
        read(e, clock)
    alone = {"weights": {"queue": 0, "kv_cache": 0, "in_flight": 0, "prefix": 3}}
    balancer = indexed(eps, clock, PrefixIndex(10_000), scoring=alone)
    picks = take(balancer, 100, key=prompt(1, 0))
    assert len(picks) == 4 and min(picks.values()) >= 15, picks


async def test_the_index_outlives_a_reload_and_forgets_backends_that_left() -> None:
    reg = registry()
    text = ("models:\n  m:\n    policy: cache_aware\n    endpoints: [chat]\n"
            "    backends: [{url: 'http://e0:8000'}, {url: 'http://e1:8000'}]\n")
    first = await snapshot.build(config.parse(text.encode()), reg, Resolver())
    index = first.models["m"].cluster.prefix_index
    assert index is not None
    index.record("http://e1:8000", text_blocks("a prompt " * 10, 16))
    index.record("http://e0:8000", text_blocks("another one " * 10, 16))
    again = await snapshot.build(config.parse(text.replace(
        ", {url: 'http://e1:8000'}", "").encode()), reg, Resolver())
    assert again.models["m"].cluster.prefix_index is index
    assert index.endpoints() == ["http://e0:8000"]  # e1 left the model
    plain = await snapshot.build(config.parse(text.replace("cache_aware", "load_aware")
                                              .encode()), reg, Resolver())
    assert plain.models["m"].cluster.prefix_index is None
    assert reg.prefix_indexes.sizes() == []  # no cache_aware model: no index kept


async def test_a_scrape_still_showing_saturation_wakes_no_waiter() -> None:
    """Each scrape ends in ``load_changed``: with every engine saturated and requests
    queued, a reading that still shows the engine full leaves the queue alone (waking it
    five times a second per backend only to requeue everyone); one with room wakes it."""
    clock = Clock()
    a, b = endpoints(registry(), 2)
    config = model_config(policy="load_aware", queue={"size": 4, "timeout": "30s"})
    cluster = Cluster(config, named([a, b]), OutlierDetection())
    cluster.balancer = cluster.scored = make_balancer(  # type: ignore[assignment]
        config, cluster.routable, clock)
    read(a, clock, waiting=20)
    read(b, clock, waiting=20)
    waiting = asyncio.ensure_future(cluster.acquire(None, set()))
    await asyncio.sleep(0)
    [(future, _)] = cluster.waiters
    read(b, clock, waiting=20)
    b.load_changed()
    assert not future.done()  # set_result is synchronous: nothing woke it
    read(b, clock, waiting=0)
    b.load_changed()
    assert future.done()
    assert await asyncio.wait_for(waiting, 5) is b


def test_an_adapter_of_a_cache_aware_model_is_routed_by_load_alone() -> None:
    """An adapter's cluster has no prefix index: its prefix weight is 0, not the
    consistent-hash fallback at the model's weight (which would pile a shared prompt
    onto one backend, with no bounded load)."""
    a, b = endpoints(registry(), 2)
    base = Cluster(model_config(policy="cache_aware"), named([a, b]), OutlierDetection(),
                   PrefixIndex(100))
    adapter = AdapterCluster(base, "sql", named([a, b]))
    assert adapter.scored is not None and adapter.scored.key_scorer is None
    assert adapter.config.scoring.weights.prefix == 0
    assert base.config.scoring.weights.prefix == 6  # the base model keeps its own
