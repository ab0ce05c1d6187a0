"""``serve``'s start-up warning about per-worker rate limits, called in-process.

``_warn_unshared_limits`` reads the resolved auth block, where a key's ``model_limits``
is a tuple of (pattern, Limits) pairs: every key shape must pass through it.
"""

from __future__ import annotations

import logging

import pytest

from router.cli import _warn_unshared_limits
from router.config import RoutesConfig, parse
from router.tenants.config import hash_key

MODELS = """\
models:
  m:
    backends:
      - url: http://127.0.0.1:9
    endpoints: [chat]
"""

#: key id → the key's extra YAML lines (its limits), one key of each shape.
SHAPES = {
    "plain": [],
    "key-wide": ["      limits: {rpm: 60}"],
    "tpm-only": ["      limits: {tpm: 1000}"],
    "per-model": ["      model_limits:", "        'chat-*': {tpm: 500}"],
    "both": ["      limits: {rpm: 60}", "      model_limits:", "        m: {rpm: 5}"],
    "empty-model-entry": ["      model_limits:", "        m: {}"],
}
LIMITED = ["key-wide", "tpm-only", "per-model", "both"]


def config_with(key_ids: list[str], admin: bool = True) -> RoutesConfig:
    lines = [MODELS + "auth:", "  keys:"]
    for i, key_id in enumerate(key_ids):
        lines += [f"    - id: {key_id}", f"      hash: {hash_key(f'ry-{i}-' + 'k' * 40)}",
                  "      models: ['*']", *SHAPES[key_id]]
    if admin:
        lines += ["  admin_keys:", "    - id: ops", f"      hash: {hash_key('ry-ops-' + 'o' * 40)}"]
    return parse(("\n".join(lines) + "\n").encode())


@pytest.fixture(autouse=True)
def no_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROUTEYARD_REDIS_URL", raising=False)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "routeyard" and r.levelno == logging.WARNING]


@pytest.mark.parametrize("key_id", list(SHAPES))
def test_each_key_shape_alone(key_id: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="routeyard")
    _warn_unshared_limits(config_with([key_id]), 2)
    if key_id in LIMITED:
        [message] = warnings(caplog)
        assert f"1 key(s) ({key_id})" in message and "2x its rpm/tpm" in message
    else:
        assert warnings(caplog) == []


def test_all_shapes_together_name_only_the_limited_keys(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="routeyard")
    _warn_unshared_limits(config_with(list(SHAPES)), 3)
    [message] = warnings(caplog)
    assert f"rate limits of {len(LIMITED)} key(s) ({', '.join(LIMITED)})" in message
    assert "with 3 workers" in message and "3x its rpm/tpm" in message
    assert "plain" not in message and "empty-model-entry" not in message
    assert "ops" not in message
    assert "ROUTEYARD_REDIS_URL" in message


def test_no_warning_for_one_worker_redis_or_no_auth(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.WARNING, logger="routeyard")
    config = config_with(list(SHAPES))
    _warn_unshared_limits(config, 1)
    _warn_unshared_limits(parse(MODELS.encode()), 4)
    monkeypatch.setenv("ROUTEYARD_REDIS_URL", "redis://127.0.0.1:6379/0")
    _warn_unshared_limits(config, 4)
    assert warnings(caplog) == []
