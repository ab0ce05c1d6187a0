"""Shared helpers for the socket-free tests of endpoints, balancers, clusters, health,
snapshots and reloads: configs from plain dicts, endpoints over ``MockTransport``, a fake
clock, and a poll for positive signals."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from router.cluster import Cluster
from router.config import ModelConfig, OutlierDetection, RoutesConfig, parse
from router.endpoint import Endpoint, EndpointRegistry, Member
from router.health import Health, HealthBoard
from router.upstream_mock import Handler, MockReply, MockRequest, MockTransport

#: Outlier detection that never ejects by accident in capacity tests.
NO_EJECTION = OutlierDetection(consecutive_failures=1000, ejection=30.0)


def ok(_request: MockRequest) -> MockReply:
    """A backend that answers 200 to everything (``/health`` included)."""
    return MockReply(200, [(b"content-type", b"application/json")], [b"{}"])


def routes(spec: dict[str, Any], source: str = "<test>") -> RoutesConfig:
    """A validated config from a plain dict (JSON is YAML)."""
    return parse(orjson.dumps(spec), source)


def model_config(name: str = "m", **fields: Any) -> ModelConfig:
    """One model's resolved config; ``fields`` are routes.yaml keys of the model
    (``policy``, ``queue``, ``max_in_flight``...). Backends are placeholders: tests pass
    their own members to ``Cluster``."""
    spec: dict[str, Any] = {"backends": [{"url": "http://placeholder:8000"}],
                            "endpoints": ["chat"], **fields}
    return routes({"models": {name: spec}}).models[name]


def registry(handler: Handler = ok, board: HealthBoard | None = None) -> EndpointRegistry:
    return EndpointRegistry(transports=lambda origin: MockTransport(handler), board=board)


def endpoints(reg: EndpointRegistry, n: int, max_in_flight: int | None = None,
              prefix: str = "http://e") -> list[Endpoint]:
    """``n`` endpoints ``http://e0:8000`` ... of ``reg``."""
    found = [reg.get(f"{prefix}{i}:8000") for i in range(n)]
    for endpoint in found:
        endpoint.max_in_flight = max_in_flight
    return found


def members(eps: Iterable[Endpoint], weights: Iterable[int] | None = None) -> list[Member]:
    eps = list(eps)
    ws = list(weights) if weights is not None else [1] * len(eps)
    return [Member(e, w) for e, w in zip(eps, ws, strict=True)]


def cluster(n: int = 2, *, limit: int | None = 1, name: str = "m",
            reg: EndpointRegistry | None = None, outlier: OutlierDetection = NO_EJECTION,
            **fields: Any) -> Cluster:
    """A cluster of ``n`` fresh endpoints, each taking ``limit`` requests at a time;
    ``fields`` are the model's routes.yaml keys (its own ``max_in_flight``, ``queue``...)."""
    reg = reg or registry()
    return Cluster(model_config(name, **fields), members(endpoints(reg, n, limit)), outlier)


def eject(endpoint: Endpoint, until: float | None = None) -> None:
    """Mark ``endpoint`` ejected until monotonic time ``until`` (default: an hour from
    now), without telling any listener."""
    health = endpoint.health
    health.ejected, health.up = True, False
    health.ejected_until = time.monotonic() + 3600 if until is None else until


class FakeClock:
    """Stands in for the ``time`` module of a router module (``monotonic`` and ``time``),
    leaving the event loop's own clock alone."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now + 1.7e9

    def perf_counter(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Transitions:
    """A ``HealthBoard`` listener that records (key, before, after)."""

    def __init__(self, board: HealthBoard) -> None:
        self.seen: list[tuple[str, str, str]] = []
        board.listeners.append(self)

    def __call__(self, health: Health, before: str, after: str) -> None:
        self.seen.append((health.key, before, after))


async def eventually(condition: Callable[[], bool], timeout: float = 1.0,
                     what: str = "the condition") -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        await asyncio.sleep(0.002)


async def settle(rounds: int = 5) -> None:
    """Let woken tasks run a few loop iterations."""
    for _ in range(rounds):
        await asyncio.sleep(0)
