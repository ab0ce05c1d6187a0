"""API keys, per-key models and limits, and the Files/Batch API, through a real router."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from router.tenants.config import hash_key
from tests.conftest import routes_yaml
from tests.harness import Router, sha256, start_router, wait_until

KEY_A = "ry-team-a-" + "a" * 40
KEY_B = "ry-team-b-" + "b" * 40
KEY_ADMIN = "ry-admin-" + "c" * 40


def auth_yaml(keys: list[tuple[str, str, str, str]], tmp: Path) -> str:
    lines = ["auth:", "  keys:"]
    for key_id, key, models, limits in keys:
        lines += [f"    - id: {key_id}", f"      hash: {hash_key(key)}",
                  f"      models: {models}"]
        if limits:
            lines.append(f"      limits: {limits}")
    lines += ["  admin_keys:", "    - id: ops", f"      hash: {hash_key(KEY_ADMIN)}",
              "batch:", f"  database_url: sqlite+aiosqlite:///{tmp}/batch.db",
              f"  storage: {{url: {tmp}/files}}", "  poll_interval: 100ms"]
    return "\n".join(lines) + "\n"


KEYS = [("team-a", KEY_A, '["chat-*", embed-model]', "{rpm: 1000}"),
        ("team-b", KEY_B, "[embed-model]", "{rpm: 3}")]


@pytest.fixture(scope="module")
def secured(engines: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    """One router for the module: only the rate limit test sends team-b requests that
    count (model lists, refusals and batch calls do not), and the revocation test puts
    the config back."""
    tmp = tmp_path_factory.mktemp("secured")
    text = routes_yaml(engines) + auth_yaml(KEYS, tmp)
    with start_router(tmp, text, admin_key=KEY_ADMIN) as router:
        yield router


def sdk(router: Router, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{router.url}/v1", api_key=key, max_retries=0)


def test_missing_and_unknown_keys_are_401(secured: Router) -> None:
    r = secured.client.post("/v1/chat/completions", json={"model": "chat-model"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        sdk(secured, "ry-wrong-" + "x" * 40).models.list()
    r = secured.client.post("/tokenize", json={"model": "chat-model", "prompt": "a"},
                            headers={"x-api-key": KEY_A})
    assert r.status_code == 200


def test_models_a_key_may_not_use_do_not_exist_for_it(secured: Router) -> None:
    assert {m.id for m in sdk(secured, KEY_A).models.list()} == {"chat-model", "embed-model"}
    assert {m.id for m in sdk(secured, KEY_B).models.list()} == {"embed-model"}
    with pytest.raises(openai.NotFoundError) as info:
        sdk(secured, KEY_B).chat.completions.create(
            model="chat-model", messages=[{"role": "user", "content": "a"}])
    assert info.value.code == "model_not_found"


def test_backend_never_sees_the_client_key(secured: Router, engines: dict, fake_only) -> None:
    request_id = f"key-{time.monotonic_ns()}"
    sdk(secured, KEY_A).chat.completions.create(
        model="chat-model", messages=[{"role": "user", "content": "a"}],
        extra_headers={"x-request-id": request_id})
    seen = [r for r in httpx.get(engines["generate"] + "/_fake/requests").json()
            if r["headers"].get("x-request-id") == request_id]
    assert seen and "authorization" not in seen[0]["headers"]
    assert "x-api-key" not in seen[0]["headers"]


def test_rate_limit_is_429_with_retry_after(secured: Router) -> None:
    statuses = []
    for _ in range(5):
        r = secured.client.post("/v1/embeddings", json={"model": "embed-model", "input": "a"},
                                headers={"authorization": f"Bearer {KEY_B}"})
        statuses.append(r.status_code)
    assert statuses[:3] == [200, 200, 200] and statuses[3:] == [429, 429]
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(r.headers["retry-after"]) >= 1
    assert "x-ratelimit-limit-requests" in r.headers


def test_admin_endpoints_need_the_admin_key(secured: Router) -> None:
    assert secured.client.get("/admin/config").status_code == 401
    r = secured.client.get("/admin/config", headers={"authorization": f"Bearer {KEY_A}"})
    assert r.status_code == 403
    r = secured.client.get("/admin/config", headers={"authorization": f"Bearer {KEY_ADMIN}"})
    assert r.status_code == 200


def test_revoked_key_stops_working_within_two_seconds(secured: Router) -> None:
    original = secured.config.read_text()
    engines_text = original.split("auth:")[0]
    secured.config.write_text(engines_text + auth_yaml(KEYS[1:], secured.config.parent))
    try:
        wait_until(lambda: secured.client.get("/v1/models", headers={
            "authorization": f"Bearer {KEY_A}"}).status_code == 401, 2,
            "the revoked key is refused")
    finally:
        secured.config.write_text(original)
        secured.wait_for_sha(sha256(original), 5)  # the keys are back for the next tests
    r = secured.client.get("/v1/models", headers={"authorization": f"Bearer {KEY_A}"})
    assert r.status_code == 200


def test_batch_through_the_router_with_tenant_isolation(secured: Router) -> None:
    a, b = sdk(secured, KEY_A), sdk(secured, KEY_B)
    lines = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "chat-model", "max_tokens": 3,
                       "messages": [{"role": "user", "content": f"hi {i}"}]}}
             for i in range(5)]
    data = "\n".join(json.dumps(line) for line in lines).encode()
    upload = a.files.create(file=("in.jsonl", data), purpose="batch")
    batch = a.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                             completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        b.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        b.files.content(upload.id)
    batch = wait_until(lambda: (b := a.batches.retrieve(batch.id)).status in (
        "completed", "failed", "expired", "cancelled") and b, 30, f"batch {batch.id} ends")
    assert batch.status == "completed", batch.errors
    assert batch.request_counts.completed == 5
    out = [json.loads(x) for x in a.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in out) == [f"req-{i}" for i in range(5)]
    assert all(o["response"]["status_code"] == 200 for o in out)


def test_engine_api_key_replaces_the_client_key(engines: dict, launch_router, fake_only) -> None:
    """A backend's `api_key_env` is sent as the engine's key; the client's never is."""
    extra = ("  keyed-model:\n    backends:\n"
             f"      - url: {engines['generate']}\n        api_key_env: TEST_ENGINE_KEY\n"
             "    backend_model: chat-model\n    endpoints: [tokenize]\n")
    router = launch_router(routes_yaml(engines, extra), env={"TEST_ENGINE_KEY": "engine-secret"})
    request_id = f"engine-key-{time.monotonic_ns()}"
    r = router.client.post("/tokenize", json={"model": "keyed-model", "prompt": "a"},
                           headers={"authorization": "Bearer client-key",
                                    "x-request-id": request_id})
    assert r.status_code == 200, r.text
    seen = [x for x in httpx.get(engines["generate"] + "/_fake/requests").json()
            if x["headers"].get("x-request-id") == request_id]
    assert seen[0]["headers"]["authorization"] == "Bearer engine-secret"
