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
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, Router, free_port, start_router, stop, wait_healthy

#: The model name the fake engines serve; public names map to it with ``backend_model``.
ENGINE_MODEL = "fleet-model"
CHAT = "/v1/chat/completions"


class Engine:
    """One fake engine process on a fixed port that survives restarts."""

    def __init__(self, name: str, logs: Path, *, latency_ms: float = 0,
                 port: int | None = None) -> None:
        self.name = name
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = logs / f"engine-{name}-{self.port}.log"
        self.default_latency_ms = latency_ms
        self.latency_ms = latency_ms
        self.proc: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"Engine({self.name} :{self.port})"

    # -- process control ---------------------------------------------------------------------
    def launch(self, latency_ms: float | None = None) -> None:
        """Start the process; ``wait`` for it to answer."""
        self.latency_ms = self.default_latency_ms if latency_ms is None else latency_ms
        args = [sys.executable, "-m", "router.cli", "fake-engine", "--model", ENGINE_MODEL,
                "--task", "generate", "--port", str(self.port),
                "--latency-ms", str(self.latency_ms)]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                         start_new_session=True)

    def wait(self, timeout: float = 30) -> None:
        assert self.proc is not None
        try:
            wait_healthy(f"{self.url}/health", self.proc, timeout)
        except RuntimeError:
            raise RuntimeError(f"{self} failed to start:\n{self.log.read_text()[-3000:]}") from None

    def start(self, latency_ms: float | None = None) -> None:
        self.launch(latency_ms)
        self.wait()

    def kill(self) -> None:
        """SIGKILL the process group: no goodbye to open connections."""
        if self.proc is not None:
            stop(self.proc, signal.SIGKILL)

    def stop(self, grace: float = 1.0) -> None:
        """SIGTERM (the engine stops accepting), then SIGKILL after ``grace`` seconds: under
        keep-alive load a Sanic engine would otherwise drain for its full 15 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.kill()

    def restart(self, latency_ms: float | None = None) -> None:
        self.kill()
        self.start(latency_ms)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restore(self) -> None:
        """Running with its default latency and an empty request log."""
        if not self.running or self.latency_ms != self.default_latency_ms:
            self.restart()
        self.reset()

    # -- introspection -------------------------------------------------------------------
    def requests(self, path: str = CHAT) -> list[dict[str, Any]]:
        return httpx.get(f"{self.url}/_fake/requests", params={"path": path}, timeout=10).json()

    def count(self, path: str = CHAT) -> int:
        return len(self.requests(path))

    def reset(self) -> None:
        httpx.post(f"{self.url}/_fake/reset", timeout=10).raise_for_status()


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
    everyone = [*fleet.engines, fleet.slow, fleet.hung]
    try:
        for engine in everyone:
            engine.launch()
        for engine in everyone:
            engine.wait()
        yield fleet
    finally:
        for engine in everyone:
            engine.kill()


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


def rewrite(router: Router, text: str, timeout: float = 5.0) -> None:
    """Replace the routes file (write to a temp file, rename) and wait until it is live."""
    tmp = router.config.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, router.config)
    router.wait_for_sha(hashlib.sha256(text.encode()).hexdigest(), timeout)


@pytest.fixture
def launch_router(tmp_path: Path) -> Iterator[Callable[[str], Router]]:
    """Start a router on a routes text; stopped at the end of the test."""
    started: list[Router] = []

    def launch(text: str) -> Router:
        router = start_router(tmp_path, text)
        started.append(router)
        return router

    yield launch
    for router in started:
        stop(router.proc)


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


def failures(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if not o.ok]


def assert_no_failures(outcomes: list[Outcome], at_least: int) -> None:
    bad = failures(outcomes)
    assert not bad, f"{len(bad)} of {len(outcomes)} requests failed, e.g. {bad[:5]}"
    assert len(outcomes) >= at_least


# -- the router's admin view ----------------------------------------------------------------

def backends(router: Router, name: str) -> list[dict[str, Any]]:
    return router.client.get("/admin/backends").json()[name]["backends"]


def state_of(router: Router, name: str, engine: Engine) -> str:
    (entry,) = [b for b in backends(router, name) if b["url"] == engine.url]
    return entry["state"]


def wait_healthy_backends(router: Router, *names: str, timeout: float = 5.0) -> None:
    """Wait until every backend of the named models is healthy in the router's view (an
    engine a previous test stopped is back, and the health checks have seen it)."""
    def all_healthy() -> bool:
        view = router.client.get("/admin/backends").json()
        return all(b["state"] == "healthy" for n in names for b in view[n]["backends"])

    wait_until(all_healthy, timeout, f"every backend of {', '.join(names)} is healthy")


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what} (last: {value!r})")
        time.sleep(interval)
