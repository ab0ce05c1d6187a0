"""Rate limits hold across two router processes sharing the real Redis at 127.0.0.1:6379."""

from __future__ import annotations

import asyncio
import os
import socket
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


@pytest.fixture
def two_routers(engines: dict, tmp_path: Path, request: pytest.FixtureRequest):
    if not redis_up():
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail("Redis at 127.0.0.1:6379 is required under CI")
        pytest.skip("no Redis at 127.0.0.1:6379")
    limits = request.param
    auth = ("auth:\n  keys:\n    - id: shared\n"
            f"      hash: {hash_key(KEY)}\n      models: [chat-model]\n      limits: {limits}\n")
    env = {"ROUTEYARD_REDIS_URL": "redis://127.0.0.1:6379/0",
           "ROUTEYARD_REDIS_PREFIX": f"routeyard-test:{uuid.uuid4().hex}:"}
    routers = []
    for name in ("a", "b"):
        config = tmp_path / name / "routes.yaml"
        config.parent.mkdir()
        config.write_text(routes_yaml(engines) + auth)
        routers.append(Router(config, env=env))
    with running(routers):  # both start at once
        yield routers


async def _burst(urls: list[str], count: int) -> list[int]:
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        responses = await asyncio.gather(*(
            client.post(f"{urls[i % len(urls)]}/tokenize", json=BODY,
                        headers={"authorization": f"Bearer {KEY}"})
            for i in range(count)))
    return [r.status_code for r in responses]


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
