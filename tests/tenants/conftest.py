"""Fixtures for the tenants tests: keys, an auth config, and Redis servers.

``shared_redis`` is the machine's Redis at 127.0.0.1:6379 (``ROUTEYARD_TEST_REDIS_URL``
overrides): skipped when it is not running,
except under CI (``CI=true``), where a missing Redis fails the tests. ``own_redis`` is a
``redis-server`` this test starts on a free port, so it can be stopped and restarted.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from router.tenants import AuthConfig, Authenticator, hash_key
from tests.harness import Process, free_port

SHARED_REDIS = os.environ.get("ROUTEYARD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
KEY_ALICE = "ry-alice-0123456789abcdefghijklmnopqrstuvwxyz"
KEY_BOB = "ry-bob-0123456789abcdefghijklmnopqrstuvwxyz"
KEY_ADMIN = "ry-admin-0123456789abcdefghijklmnopqrstuvwxyz"


def authenticator(keys: list[dict[str, Any]], **auth: Any) -> Authenticator:
    return Authenticator.from_config(AuthConfig.model_validate({"keys": keys, **auth}), environ={})


def alice(**entry: Any) -> dict[str, Any]:
    """Alice's key entry; ``entry`` overrides its fields."""
    return {"id": "alice", "tenant": "team-a", "hash": hash_key(KEY_ALICE),
            "models": ["chat-*", "embed-model"], **entry}


@pytest.fixture
async def shared_redis() -> AsyncIterator[str]:
    """A unique key prefix on the shared Redis; its keys are deleted afterwards."""
    client = aioredis.Redis.from_url(SHARED_REDIS)
    try:
        await client.ping()
    except (redis.RedisError, OSError) as exc:
        await client.aclose()
        message = f"Redis at {SHARED_REDIS} is not reachable: {exc}"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(message + " (required under CI)")
        pytest.skip(message)
    prefix = f"routeyard-test:{uuid.uuid4().hex}:"
    yield prefix
    keys = [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def _pings(port: int) -> bool:
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
    finally:
        client.close()


class OwnRedis(Process):
    """A throwaway redis-server on a free port (no persistence); ready once it answers
    PING. A test may ``kill`` it and ``start`` it again on the same port."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        super().__init__(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--dir", str(workdir)],
            workdir / f"redis-{self.port}.log", ready=lambda _: _pings(self.port),
            ready_timeout=10, name=f"redis-server :{self.port}")


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    with OwnRedis(binary, tmp_path) as server:
        yield server
