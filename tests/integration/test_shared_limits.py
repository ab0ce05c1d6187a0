"""Rate limits hold across router processes sharing the real Redis at 127.0.0.1:6379, also
under bursts larger than a router's Redis connection pool."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from pathlib import Path

import httpx
import orjson
import pytest

from router.tenants.config import hash_key
from router.tenants.limits import estimate_tokens
from tests.conftest import routes_yaml
from tests.harness import Router, running

KEY = "ry-shared-" + "s" * 40
BODY = {"model": "chat-model", "prompt": "count me", "max_tokens": 10}


def redis_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1):
            return True
    except OSError:
        return False


def _routers(engines: dict, tmp_path: Path, limits: str, names: tuple[str, ...],
             **env_extra: str):
    """Routers sharing the real Redis under one fresh prefix, each with the key ``KEY``."""
    if not redis_up():
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail("Redis at 127.0.0.1:6379 is required under CI")
        pytest.skip("no Redis at 127.0.0.1:6379")
    auth = ("auth:\n  keys:\n    - id: shared\n"
            f"      hash: {hash_key(KEY)}\n      models: [chat-model]\n      limits: {limits}\n")
    env = {"ROUTEYARD_REDIS_URL": "redis://127.0.0.1:6379/0",
           "ROUTEYARD_REDIS_PREFIX": f"routeyard-test:{uuid.uuid4().hex}:", **env_extra}
    routers = []
    for name in names:
        config = tmp_path / name / "routes.yaml"
        config.parent.mkdir()
        config.write_text(routes_yaml(engines) + auth)
        routers.append(Router(config, env=env))
    return running(routers)  # all start at once


@pytest.fixture
def two_routers(engines: dict, tmp_path: Path, request: pytest.FixtureRequest):
    with _routers(engines, tmp_path, request.param, ("a", "b")) as routers:
        yield routers


@pytest.fixture
def one_router(engines: dict, tmp_path: Path, request: pytest.FixtureRequest):
    with _routers(engines, tmp_path, request.param, ("a",)) as routers:
        yield routers[0]


@pytest.fixture
def starved_router(engines: dict, tmp_path: Path):
    """One Redis connection, and next to no wait for it: most of a burst finds it busy."""
    with _routers(engines, tmp_path, "{rpm: 30}", ("a",),
                  ROUTEYARD_REDIS_MAX_CONNECTIONS="1",
                  ROUTEYARD_REDIS_POOL_TIMEOUT="0.001") as routers:
        yield routers[0]


async def _burst(urls: list[str], count: int) -> list[int]:
    return [int(answer.split(maxsplit=2)[1]) for answer in await _answers(urls, count)]


async def _answers(urls: list[str], count: int) -> list[bytes]:
    """The raw answers to ``count`` requests in flight at once, round robin over ``urls``.

    Every connection is open before the first request is written, and the requests are
    written back to back, so the burst is not spread out by connection set-up or by the
    client's own speed. Fails if the answers took so long (2 s) that a limit of 30 a
    minute could have refilled a request meanwhile."""
    body = orjson.dumps(BODY)
    request = (f"POST /tokenize HTTP/1.1\r\nhost: router\r\nauthorization: Bearer {KEY}\r\n"
               f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
               "connection: close\r\n\r\n").encode() + body
    addresses = [httpx.URL(url) for url in urls]
    connections = await asyncio.gather(*(
        asyncio.open_connection(addresses[i % len(urls)].host, addresses[i % len(urls)].port)
        for i in range(count)))

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        try:
            return await reader.read()  # until the router closes
        finally:
            writer.close()

    start = time.monotonic()
    for _, writer in connections:
        writer.write(request)
    answers = await asyncio.gather(*(answer(r, w) for r, w in connections))
    assert time.monotonic() - start < 2, "the burst was too slow to count exactly"
    return answers


# A router's Redis pool holds 100 connections: 200 requests at one router run it dry.
# They must wait for a connection, not fall back to per-process limits (which admitted
# 30 in Redis plus 30 locally, per router).
@pytest.mark.parametrize("one_router", ["{rpm: 30}"], indirect=True)
def test_rpm_is_exact_under_a_burst_of_200_at_one_router(one_router) -> None:
    statuses = asyncio.run(_burst([one_router.url], 200))
    assert statuses.count(200) == 30
    assert statuses.count(429) == 170


@pytest.mark.parametrize("two_routers", ["{rpm: 30}"], indirect=True)
def test_rpm_is_exact_under_a_burst_of_200_at_each_of_two_routers(two_routers) -> None:
    statuses = asyncio.run(_burst([r.url for r in two_routers], 400))
    assert statuses.count(200) == 30
    assert statuses.count(429) == 370


def test_a_router_out_of_redis_connections_refuses_with_503_not_local_limits(
    starved_router,
) -> None:
    """Requests that get no Redis connection in time are refused, not admitted on local
    limits: never more than the limit gets through, and the limiter stays on Redis."""
    answers = asyncio.run(_answers([starved_router.url], 200))
    statuses = [int(a.split(maxsplit=2)[1]) for a in answers]
    assert statuses.count(200) <= 30
    assert statuses.count(503) > 0
    assert statuses.count(200) + statuses.count(429) + statuses.count(503) == 200
    busy = next(a for a in answers if a.startswith(b"HTTP/1.1 503"))
    head, _, body = busy.partition(b"\r\n\r\n")
    assert b"\r\nretry-after: 1\r\n" in head.lower()
    assert orjson.loads(body)["error"]["code"] == "rate_limiter_busy"
    # Redis never counted as down: no fall-back warning, one warning about the pool.
    assert not starved_router.find_log("limiting in-process")
    assert starved_router.find_log("no Redis connection free within 0.001s")


@pytest.mark.parametrize("two_routers", ["{rpm: 50}"], indirect=True)
def test_rpm_is_exact_across_two_routers(two_routers) -> None:
    statuses = asyncio.run(_burst([r.url for r in two_routers], 200))
    assert statuses.count(200) == 50
    assert statuses.count(429) == 150


TOKENS_EACH = estimate_tokens(len(orjson.dumps(BODY)), BODY)


@pytest.mark.parametrize("two_routers", [f"{{tpm: {TOKENS_EACH * 40 + TOKENS_EACH // 2}}}"],
                         indirect=True)
def test_tpm_is_exact_across_two_routers(two_routers) -> None:
    """/tokenize reports no usage, so each request costs exactly its estimate."""
    statuses = asyncio.run(_burst([r.url for r in two_routers], 200))
    assert statuses.count(200) == 40
    assert statuses.count(429) == 160
