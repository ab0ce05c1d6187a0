"""router/scraper.py and discovery.apply_limits' scrape settings: what is read, when, and
what a failed read leaves. Endpoints answer through ``MockTransport``; a fake clock."""

from __future__ import annotations

import asyncio
from typing import Any

from router.cluster import Cluster
from router.config import OutlierDetection
from router.discovery import Resolver, apply_limits
from router.endpoint import Endpoint, Member
from router.engine_load import EngineReading, ScrapeSettings
from router.errors import BackendUnavailable
from router.scraper import Scraper, scrape
from router.snapshot import build
from router.upstream_mock import MockReply, MockRequest
from tests.unit.fleet_core import endpoints, model_config, registry, routes, settle
from tests.vllm_metrics import metrics_text

SETTINGS = ScrapeSettings("/metrics", 0.2, 0.2)


class Engine:
    """A backend whose ``/metrics`` answers what the test sets (or fails with it)."""

    def __init__(self) -> None:
        self.reply: MockReply | Exception = self.metrics(0, 0, 0.0)
        self.asked: list[MockRequest] = []

    @staticmethod
    def metrics(running: int, waiting: int, kv: float) -> MockReply:
        body = metrics_text(running, waiting, kv).encode()
        return MockReply(200, [(b"content-type", b"text/plain"),
                               (b"content-length", str(len(body)).encode())], [body])

    def __call__(self, request: MockRequest) -> MockReply:
        self.asked.append(request)
        if isinstance(self.reply, Exception):
            raise self.reply
        return self.reply


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


async def test_a_scrape_reads_the_engine_against_the_in_flight_count_when_sent() -> None:
    engine = Engine()
    engine.reply = engine.metrics(3, 1, 0.5)
    (endpoint,) = endpoints(registry(engine), 1)
    endpoint.in_flight = 2
    endpoint.api_key_header = "authorization: Bearer engine-key\r\n"
    clock = Clock()
    await scrape(endpoint, SETTINGS, clock)
    load = endpoint.load
    assert (load.running, load.waiting, load.kv_cache, load.at, load.base) == (3, 1, 0.5, 50.0, 2)
    (asked,) = engine.asked
    assert asked.method == "GET" and asked.target == "/metrics"
    assert asked.header("authorization") == "Bearer engine-key"


async def test_a_failed_scrape_keeps_the_reading_and_says_why_and_leaves_health_alone() -> None:
    engine = Engine()
    (endpoint,) = endpoints(registry(engine), 1)
    clock = Clock()
    await scrape(endpoint, SETTINGS, clock)
    for reply, error in [
        (BackendUnavailable("cannot connect to e0:8000: refused"),
         "/metrics: cannot connect to e0:8000: refused"),
        (MockReply(404, [(b"content-length", b"0")], [b""]), "/metrics: status 404"),
        (MockReply(200, [(b"content-length", b"5")], [b"up 1\n"]),
         "/metrics: no vllm:num_requests_running"),
    ]:
        engine.reply = reply
        clock.now += 1
        await scrape(endpoint, SETTINGS, clock)
        assert endpoint.load.error is not None and endpoint.load.error.startswith(error)
        assert endpoint.load.at == 50.0 and endpoint.load.read
    assert endpoint.up and endpoint.health.consecutive_failures == 0
    engine.reply = engine.metrics(1, 0, 0.0)
    await scrape(endpoint, SETTINGS, clock)
    assert endpoint.load.error is None and endpoint.load.running == 1


async def test_the_scraper_reads_due_endpoints_once_at_a_time_each_interval() -> None:
    engine = Engine()
    gate = asyncio.Event()
    slow = Engine()

    async def held(request: MockRequest) -> MockReply:
        await gate.wait()
        return slow(request)

    read, other, unread = endpoints(registry(engine), 3)
    (stuck,) = endpoints(registry(held), 1, prefix="http://stuck")
    read.scrape = other.scrape = stuck.scrape = SETTINGS
    clock = Clock()
    scraper = Scraper(lambda: [read, other, unread, stuck], clock)
    assert abs(scraper.start_due() - 0.2) < 1e-9
    await settle()
    assert len(engine.asked) == 2 and unread.load.error is None and not unread.load.read
    clock.now += 0.1
    assert abs(scraper.start_due() - 0.1) < 1e-9  # nothing due yet
    clock.now += 0.1
    scraper.start_due()
    await settle()
    assert len(engine.asked) == 4
    assert len(slow.asked) == 0 and "http://stuck0:8000" in scraper.running  # still held
    gate.set()
    await settle()
    assert len(slow.asked) == 1 and stuck.load.read and not scraper.running
    assert scraper.ended.is_set()
    scraper.close()


async def test_a_scrape_wakes_the_queues_of_the_models_routed_to_the_endpoint() -> None:
    engine = Engine()
    (endpoint,) = endpoints(registry(engine), 1)
    cluster = Cluster(model_config(policy="load_aware"), [Member(endpoint, 1, name="0")],
                      OutlierDetection())
    endpoint.load.update(EngineReading(0, 99, 0.0), 0.0, 0.0, 0)
    waiter = asyncio.get_running_loop().create_future()
    cluster.waiters.append((waiter, set()))
    await scrape(endpoint, SETTINGS)
    assert waiter.done() and not cluster.waiters


def _spec(**models: Any) -> dict[str, Any]:
    return {"defaults": {"endpoints": ["chat"]}, "models": models}


async def test_scrape_settings_follow_the_models_that_read_each_endpoint() -> None:
    reg = registry()
    config = routes(_spec(
        scored={"policy": "load_aware", "engine_metrics": {"interval": "500ms"},
                "backends": [{"url": "http://a:8000"}, {"url": "http://b:8000"}]},
        fast={"policy": "cache_aware", "engine_metrics": {"interval": "50ms",
                                                          "timeout": "1s"},
              "backends": [{"url": "http://b:8000"}]},
        shown={"engine_metrics": {"enabled": True, "path": "/engine/metrics"},
               "backends": [{"url": "http://c:8000"}]},
        plain={"backends": [{"url": "http://d:8000"}]},
    ))
    snap = await build(config, reg, Resolver())
    by_host = {e.origin.host: e for e in reg.by_key.values()}
    assert by_host["a"].scrape == ScrapeSettings("/metrics", 0.5, 0.2)
    assert by_host["b"].scrape == ScrapeSettings("/metrics", 0.05, 0.2)
    assert by_host["c"].scrape == ScrapeSettings("/engine/metrics", 0.2, 0.2)
    assert by_host["d"].scrape is None
    apply_limits([snap.models["plain"].cluster])  # a later load without scored models
    assert by_host["d"].scrape is None
    again = await build(routes(_spec(plain={"backends": [{"url": "http://a:8000"}]})), reg,
                        Resolver())
    assert again.models["plain"].cluster.endpoints[0].scrape is None


def test_members_are_named_by_name_or_position() -> None:
    config = routes(_spec(m={"backends": [{"url": "http://a:8000", "name": "gpu-a"},
                                          {"url": "http://b:8000"}]}))
    names = [b.name for b in config.models["m"].backends]
    assert names == ["gpu-a", None]


async def test_snapshot_members_carry_their_names() -> None:
    config = routes(_spec(m={"policy": "load_aware",
                             "backends": [{"url": "http://a:8000", "name": "gpu-a"},
                                          {"url": "http://b:8000"}]}))
    snap = await build(config, registry(), Resolver())
    cluster = snap.models["m"].cluster
    assert [m.name for m in cluster.members] == ["gpu-a", "1"]
    assert [v["name"] for v in cluster.describe()] == ["gpu-a", "1"]
    a: Endpoint = cluster.endpoints[0]
    assert cluster.explanation(a) == ((b"x-routeyard-backend", b"gpu-a"),)
