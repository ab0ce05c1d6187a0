"""Fleet fixtures: several fake engines (each its own process and port) behind one router.

The engines are started once per session, in parallel (a fake engine takes seconds to
import and bind). ``fleet`` hands a test three normal engines, restored and with empty
request logs; a test may kill, stop or restart them, and the next test gets them back.
Two special engines are shared too: ``slow`` (``--latency-ms 200``) and ``hung``
(``--latency-ms 60000``; the test that uses it restarts it without latency).

Routes files are written as JSON, which is YAML too; ``routes()`` adds fast fleet
defaults (health checks every 200 ms, short cool-downs and backoff).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import FakeEngine, free_port, running

#: The model name the fake engines serve; public names map to it with ``backend_model``.
ENGINE_MODEL = "fleet-model"
CHAT = "/v1/chat/completions"


class Engine(FakeEngine):
    """One fleet engine: serves ``ENGINE_MODEL``; its request counts are of chat requests
    unless a path is given."""

    def __init__(self, name: str, logs: Path, *, latency_ms: float = 0,
                 port: int | None = None) -> None:
        port = port or free_port()
        super().__init__("generate", [ENGINE_MODEL], logs / f"engine-{name}-{port}.log",
                         port=port, latency_ms=latency_ms, name=name)

    def __repr__(self) -> str:
        return f"Engine({self.name} :{self.port})"

    def stop(self, grace: float = 1.0) -> int | None:
        """SIGTERM (the engine stops accepting), then SIGKILL after ``grace`` seconds: under
        keep-alive load a Sanic engine would otherwise drain for its full 15 s."""
        return super().stop(grace)

    def restore(self) -> None:
        """Running with its default latency and an empty request log."""
        if not self.running or self.latency_ms != self.default_latency_ms:
            self.restart()
        self.reset()

    def requests(self, path: str | None = CHAT) -> list[dict[str, Any]]:
        return super().requests(path)

    def count(self, path: str | None = CHAT) -> int:
        return super().count(path)


@dataclass
class Fleet:
    engines: list[Engine]
    slow: Engine
    hung: Engine

    def __iter__(self) -> Iterator[Engine]:
        return iter(self.engines)

    def __getitem__(self, i: int) -> Engine:
        return self.engines[i]

    def counts(self, engines: list[Engine] | None = None) -> list[int]:
        return [e.count() for e in (engines or self.engines)]


@pytest.fixture(scope="session")
def fleet_procs(logs: Path) -> Iterator[Fleet]:
    fleet = Fleet([Engine(f"e{i}", logs) for i in range(3)],
                  Engine("slow", logs, latency_ms=200), Engine("hung", logs, latency_ms=60_000))
    with running([*fleet.engines, fleet.slow, fleet.hung], grace=1):
        yield fleet


@pytest.fixture
def fleet(fleet_procs: Fleet) -> Fleet:
    """Three normal engines, running and with empty request logs."""
    for engine in fleet_procs:
        engine.restore()
    return fleet_procs


# -- routes files ---------------------------------------------------------------------------

FAST_DEFAULTS: dict[str, Any] = {
    "endpoints": ["chat", "completions"],
    "health_checks": {"interval": "200ms", "timeout": "500ms",
                      "unhealthy_threshold": 2, "healthy_threshold": 1},
    "outlier_detection": {"consecutive_failures": 3, "ejection": "1s"},
    "retries": {"attempts": 2, "backoff": "10ms", "max_backoff": "100ms"},
}


def model(*engines: Engine | str, weights: list[int] | None = None, **spec: Any) -> dict:
    """A model spec over ``engines`` (or URLs), served by them as ``ENGINE_MODEL``."""
    urls = [e if isinstance(e, str) else e.url for e in engines]
    backends = [{"url": u} for u in urls]
    for backend, weight in zip(backends, weights or [], strict=False):
        backend["weight"] = weight
    return {"backends": backends, "backend_model": ENGINE_MODEL, **spec}


def routes(models: dict[str, dict], **defaults: Any) -> str:
    merged = {**FAST_DEFAULTS}
    for key, value in defaults.items():
        merged[key] = {**merged[key], **value} if isinstance(value, dict) and key in merged \
            else value
    return json.dumps({"defaults": merged, "models": models}, indent=2) + "\n"


# -- requests -----------------------------------------------------------------------------

def chat_body(name: str, content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": name, "messages": [{"role": "user", "content": content}],
            "max_tokens": 4, **extra}


@dataclass
class Outcome:
    status: int | None
    body: bytes
    headers: dict[str, str]
    error: str | None = None

    @property
    def ok(self) -> bool:
        if self.status != 200 or self.error:
            return False
        try:
            return json.loads(self.body)["object"] == "chat.completion"
        except (ValueError, KeyError, TypeError):
            return False

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Outcome({self.status}, {self.error or self.body[:200]!r})"


async def send(client: httpx.AsyncClient, url: str, body: dict[str, Any],
               headers: dict[str, str] | None = None) -> Outcome:
    try:
        r = await client.post(f"{url}{CHAT}", json=body, headers=headers)
    except httpx.HTTPError as exc:
        return Outcome(None, b"", {}, f"{type(exc).__name__}: {exc}")
    return Outcome(r.status_code, r.content, dict(r.headers))


async def hammer(
    url: str,
    name: str,
    n: int,
    concurrency: int,
    *,
    headers: dict[str, str] | None = None,
    until: asyncio.Event | None = None,
    done: list[Outcome] | None = None,
) -> list[Outcome]:
    """``n`` chat requests from ``concurrency`` workers (and more until ``until`` is set).

    Outcomes are appended to ``done`` as they finish, so a test can watch progress."""
    outcomes = done if done is not None else []
    sent = 0

    def more() -> bool:
        return sent < n or (until is not None and not until.is_set())

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal sent
        while more():
            sent += 1
            outcomes.append(await send(client, url, chat_body(name, f"request {sent}"), headers))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return outcomes


async def under_load(action: Callable[[list[Outcome]], object], url: str, name: str, n: int,
                     concurrency: int, latency_ms: int) -> list[Outcome]:
    """Chat requests from ``concurrency`` workers, each answered by the engine after
    ``latency_ms``, for as long as ``action(outcomes)`` runs in a thread and until ``n``
    were sent; the outcomes (``action`` sees them arrive)."""
    outcomes: list[Outcome] = []
    stop = asyncio.Event()
    load = asyncio.create_task(hammer(url, name, n, concurrency, until=stop, done=outcomes,
                                      headers={"x-fake-latency-ms": str(latency_ms)}))
    try:
        await asyncio.to_thread(action, outcomes)
    finally:
        stop.set()
        await load
    return outcomes


def failures(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if not o.ok]


def assert_no_failures(outcomes: list[Outcome], at_least: int) -> None:
    bad = failures(outcomes)
    assert not bad, f"{len(bad)} of {len(outcomes)} requests failed, e.g. {bad[:5]}"
    assert len(outcomes) >= at_least
