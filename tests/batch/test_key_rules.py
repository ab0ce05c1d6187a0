"""Batch lines run as the API key that created the batch, through the router's own
request path in process (``RouterDispatcher``, a mock engine, the in-process limiter on a
clock the test moves): that key's models, that key's rate limits, the usage correction,
and a reload that narrows or removes the key."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from router.batch import BatchConfig, BatchService, jobs
from router.batch.limiter import AdaptiveLimit
from router.dispatch import RouterDispatcher
from router.endpoint import EndpointRegistry
from router.errors import RouterError
from router.proxy import Proxy
from router.reload import ConfigHolder
from router.stored_responses import ResponseIds
from router.tenants.config import hash_key
from router.tenants.limits import LocalLimiter
from router.upstream_mock import MockReply, MockRequest, MockTransport
from tests.batch.conftest import FAST, chat_line, finished, lines_of, submit

BASIC, PREMIUM, TINY = ("ry-basic-" + "a" * 40, "ry-premium-" + "b" * 40,
                        "ry-tiny-" + "c" * 40)
MODELS = """\
defaults:
  endpoints: [chat]
models:
  chat-a:
    backends: [{url: "http://engine:8000"}]
  chat-a-premium:
    backends: [{url: "http://engine:8000"}]
"""


def routes(premium_models: str = '["chat-a*"]', with_tiny: bool = True) -> str:
    keys = [
        f"    - {{id: basic, tenant: acme, hash: '{hash_key(BASIC)}', models: [chat-a],"
        " limits: {rpm: 100, tpm: 100000}}",
        f"    - {{id: premium, tenant: acme, hash: '{hash_key(PREMIUM)}',"
        f" models: {premium_models}}}",
    ]
    if with_tiny:
        keys.append(f"    - {{id: tiny, hash: '{hash_key(TINY)}', models: [chat-a],"
                    " limits: {rpm: 2}}")
    return MODELS + "auth:\n  keys:\n" + "\n".join(keys) + "\n"


class Clock:
    """The limiter's clock: still unless the test moves it (no refill meanwhile)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Counting:
    """The router's dispatcher, counting the statuses its lines got."""

    def __init__(self, inner: RouterDispatcher) -> None:
        self.inner = inner
        self.statuses: Counter[int] = Counter()
        self.on_429: list[Any] = []

    def key_of(self, headers: Any) -> str | None:
        return self.inner.key_of(headers)

    def check(self, key: str | None, url: str, body: dict[str, Any]) -> str | None:
        return self.inner.check(key, url, body)

    async def dispatch(self, url: str, body: bytes, key: str | None) -> tuple[int, bytes]:
        status, payload = await self.inner.dispatch(url, body, key)
        self.statuses[status] += 1
        if status == 429:
            for hook in self.on_429:
                hook()
        return status, payload

    def pressure(self) -> float:
        return self.inner.pressure()


@dataclass
class Routed:
    service: BatchService
    dispatcher: Counting
    holder: ConfigHolder
    limiter: LocalLimiter
    clock: Clock
    sent: Counter[str] = field(default_factory=Counter)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    windows: list[AdaptiveLimit] = field(default_factory=list)

    async def reload(self, text: str) -> None:
        self.holder.path.write_text(text)
        assert await self.holder.reload()


@pytest.fixture
async def routed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Routed]:
    path = tmp_path / "routes.yaml"
    path.write_text(routes())
    routed: Routed

    async def engine(request: MockRequest) -> MockReply:
        body = orjson.loads(request.body)
        marker = body["messages"][0]["content"]
        routed.sent[marker] += 1
        if marker.startswith("gated"):
            routed.arrived.set()
            await routed.gate.wait()
        answer = orjson.dumps({"object": "chat.completion", "model": body["model"],
                               "choices": [], "usage": {"prompt_tokens": 3,
                                                        "completion_tokens": 2,
                                                        "total_tokens": 5}})
        return MockReply(200, [(b"content-type", b"application/json")], [answer])

    holder = ConfigHolder(path, EndpointRegistry(transports=lambda o: MockTransport(engine)))
    holder.settle = (0.0, 0, 1.0)  # the test writes whole files
    await holder.load()
    clock = Clock()
    limiter = LocalLimiter(clock)
    proxy = Proxy(holder, ResponseIds())
    proxy.start(limiter, [], None)
    dispatcher = Counting(RouterDispatcher(proxy))
    config = BatchConfig.model_validate({
        "database_url": f"sqlite+aiosqlite:///{tmp_path}/batch.db",
        "storage": {"url": str(tmp_path / "files")}, "workers": 1, **FAST,
        "max_attempts": 3, "initial_concurrency": 4, "max_concurrency": 4})
    service = BatchService(config)
    routed = Routed(service, dispatcher, holder, limiter, clock)

    class Window(AdaptiveLimit):  # the jobs' AIMD windows, to look at afterwards
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            routed.windows.append(self)

    monkeypatch.setattr(jobs, "AdaptiveLimit", Window)
    await service.start(dispatcher)
    yield routed
    routed.gate.set()
    await service.close(grace=5)
    holder.close()


def _by_id(lines: list[dict]) -> dict[str, dict]:
    return {line["custom_id"]: line for line in lines}


async def test_a_batch_runs_with_the_models_of_the_key_that_created_it(routed: Routed) -> None:
    """basic and premium are keys of one tenant; only premium may use chat-a-premium."""
    service = routed.service
    lines = [chat_line(f"basic-{i}", model="chat-a-premium") for i in range(3)]
    done = await finished(service, await submit(service, lines, key="basic"))
    assert done["status"] == "failed" and done["in_progress_at"] is None
    assert {(e["code"], e["line"]) for e in done["errors"]["data"]} == {
        ("model_not_available", 1), ("model_not_available", 2), ("model_not_available", 3)}
    assert all("`chat-a-premium` does not exist" in e["message"]
               for e in done["errors"]["data"])
    lines = [chat_line(f"premium-{i}", model="chat-a-premium") for i in range(3)]
    done = await finished(service, await submit(service, lines, key="premium"))
    assert done["status"] == "completed" and done["request_counts"]["completed"] == 3
    assert not [m for m in routed.sent if m.startswith("basic")]


async def test_a_reload_that_narrows_the_key_fails_its_remaining_lines(
        routed: Routed) -> None:
    service = routed.service
    service.config = service.config.model_copy(update={"max_concurrency": 1,
                                                        "initial_concurrency": 1})
    assert service.pool is not None
    service.pool.ctx.config = service.config
    lines = [chat_line("gated-0", model="chat-a-premium"),
             *(chat_line(f"after-{i}", model="chat-a-premium") for i in range(3))]
    batch_id = await submit(service, lines, key="premium")
    await asyncio.wait_for(routed.arrived.wait(), 10)  # line 1 is at the engine
    await routed.reload(routes(premium_models="[chat-a]"))
    routed.gate.set()
    done = await finished(service, batch_id)
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 4, "completed": 1, "failed": 3}
    errors = _by_id(await lines_of(service, done["error_file_id"]))
    assert sorted(errors) == ["after-0", "after-1", "after-2"]
    for line in errors.values():
        assert line["response"]["status_code"] == 404
        assert line["response"]["body"]["error"]["code"] == "model_not_found"
    assert not [m for m in routed.sent if m.startswith("after")]


async def test_a_removed_key_fails_the_remaining_lines(routed: Routed) -> None:
    service = routed.service
    service.config = service.config.model_copy(update={"max_concurrency": 1,
                                                        "initial_concurrency": 1})
    assert service.pool is not None
    service.pool.ctx.config = service.config
    lines = [chat_line("gated-1", model="chat-a"),
             *(chat_line(f"orphan-{i}", model="chat-a") for i in range(2))]
    batch_id = await submit(service, lines, key="tiny")
    await asyncio.wait_for(routed.arrived.wait(), 10)
    await routed.reload(routes(with_tiny=False))
    routed.gate.set()
    done = await finished(service, batch_id)
    errors = _by_id(await lines_of(service, done["error_file_id"]))
    assert sorted(errors) == ["orphan-0", "orphan-1"]
    for line in errors.values():
        assert line["response"]["status_code"] == 401
        error = line["response"]["body"]["error"]
        assert error["code"] == "invalid_api_key" and "`tiny`" in error["message"]
    assert not [m for m in routed.sent if m.startswith("orphan")]


async def test_lines_are_charged_to_the_key_and_corrected_by_their_usage(
        routed: Routed) -> None:
    """5 lines that each ask for 5,000 tokens and use 5: the key's buckets show 5
    requests and 25 tokens spent (the clock stands still: nothing refills)."""
    service = routed.service
    lines = [chat_line(f"metered-{i}", model="chat-a", max_tokens=5000) for i in range(5)]
    done = await finished(service, await submit(service, lines, key="basic"))
    assert done["status"] == "completed" and done["request_counts"]["completed"] == 5
    auth = routed.holder.current.auth
    assert auth is not None
    admission = await routed.limiter.admit(auth.tenants["basic"], "chat-a", 0)
    assert admission.headers["x-ratelimit-remaining-requests"] == str(100 - 5 - 1)
    assert admission.headers["x-ratelimit-remaining-tokens"] == str(100000 - 25 - 1)


async def test_lines_over_the_keys_rate_limit_back_off_and_are_retried(
        routed: Routed) -> None:
    """tiny has 2 requests a minute: of 4 lines sent at once, 2 pass and 2 get the
    limiter's 429. The batch halves its window and retries them later (the test moves the
    clock a minute at the first 429, so the retries fit); the engine sees each line once."""
    service = routed.service

    def a_minute_later() -> None:
        if routed.clock.now == 1000.0:
            routed.clock.now += 61

    routed.dispatcher.on_429.append(a_minute_later)
    lines = [chat_line(f"tiny-{i}", model="chat-a") for i in range(4)]
    done = await finished(service, await submit(service, lines, key="tiny"))
    assert done["status"] == "completed" and done["request_counts"]["completed"] == 4
    assert routed.dispatcher.statuses[429] >= 1 and routed.dispatcher.statuses[200] == 4
    assert [routed.sent[f"tiny-{i}"] for i in range(4)] == [1, 1, 1, 1]
    (window,) = routed.windows
    assert window.limit < 4  # halved by the 429s, not yet grown back


async def test_key_of_names_the_presented_key(routed: Routed) -> None:
    inner = routed.dispatcher.inner
    assert inner.key_of({"authorization": f"Bearer {PREMIUM}"}) == "premium"
    assert inner.key_of({"x-api-key": BASIC}) == "basic"
    with pytest.raises(RouterError) as info:
        inner.key_of({"authorization": "Bearer ry-wrong-" + "x" * 40})
    assert info.value.status == 401
    assert inner.check(None, "/v1/chat/completions", {"model": "chat-a"}) is not None
