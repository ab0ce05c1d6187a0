"""API keys, per-key models and limits, and the Files/Batch API, through a real router.

Batches run as the key that created them: that key's models and rate limits, not its
tenant's (``keyed``: two keys of one tenant, and a metered key).
"""

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


# -- batches run as the key that created them --------------------------------------------

KEY_BASIC = "ry-acme-basic-" + "d" * 40
KEY_PREMIUM = "ry-acme-premium-" + "e" * 40
KEY_METERED = "ry-metered-" + "f" * 40


def keyed_yaml(engines: dict, tmp: Path) -> str:
    models = "".join(
        f"  {name}:\n    backends:\n      - url: {engines['generate']}\n"
        "    endpoints: [chat]\n    backend_model: chat-model\n"
        for name in ("chat-a", "chat-a-premium"))
    keys = [("acme-basic", KEY_BASIC, "[chat-a]", None),
            ("acme-premium", KEY_PREMIUM, "[chat-a, chat-a-premium]", None),
            ("metered", KEY_METERED, "[chat-a]", "{rpm: 30}")]
    lines = ["auth:", "  keys:"]
    for key_id, key, allowed, limits in keys:
        lines += [f"    - id: {key_id}", f"      hash: {hash_key(key)}",
                  f"      models: {allowed}"]
        lines += ["      tenant: acme"] if key_id.startswith("acme") else []
        lines += [f"      limits: {limits}"] if limits else []
    lines += ["batch:", f"  database_url: sqlite+aiosqlite:///{tmp}/batch.db",
              f"  storage: {{url: {tmp}/files}}", "  poll_interval: 100ms"]
    return routes_yaml(engines, models) + "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def keyed(engines: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    tmp = tmp_path_factory.mktemp("keyed")
    with start_router(tmp, keyed_yaml(engines, tmp)) as router:
        yield router


def _chat_lines(prefix: str, model: str, count: int) -> bytes:
    return "\n".join(json.dumps({
        "custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": model, "max_tokens": 1,
                 "messages": [{"role": "user", "content": f"{prefix}-{i}"}]}})
        for i in range(count)).encode()


def _run_batch(client: openai.OpenAI, data: bytes) -> openai.types.Batch:
    upload = client.files.create(file=("in.jsonl", data), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    return wait_until(lambda: (b := client.batches.retrieve(batch.id)).status in (
        "completed", "failed", "expired", "cancelled") and b, 30, f"batch {batch.id} ends")


def test_a_batch_runs_with_the_models_of_its_key_not_of_its_tenant(
        keyed: Router, engines: dict, fake_only: None) -> None:
    """acme-basic and acme-premium are keys of one tenant: a batch of the basic key may
    not use chat-a-premium, as its online requests may not."""
    basic, premium = sdk(keyed, KEY_BASIC), sdk(keyed, KEY_PREMIUM)
    with pytest.raises(openai.NotFoundError) as info:
        basic.chat.completions.create(model="chat-a-premium", max_tokens=1,
                                      messages=[{"role": "user", "content": "a"}])
    assert info.value.code == "model_not_found"
    batch = _run_batch(basic, _chat_lines("basic-premium", "chat-a-premium", 3))
    assert batch.status == "failed" and batch.errors is not None
    assert [(e.code, e.line) for e in batch.errors.data] == [
        ("model_not_available", 1), ("model_not_available", 2), ("model_not_available", 3)]
    assert all("`chat-a-premium` does not exist" in (e.message or "")
               for e in batch.errors.data)
    batch = _run_batch(premium, _chat_lines("premium-premium", "chat-a-premium", 3))
    assert batch.status == "completed" and batch.request_counts.completed == 3
    markers = [str((r.get("json") or {}).get("messages", [{}])[0].get("content"))
               for r in httpx.get(engines["generate"] + "/_fake/requests").json()]
    assert not [m for m in markers if m.startswith("basic-premium")]
    assert len([m for m in markers if m.startswith("premium-premium")]) == 3


def test_batch_lines_count_toward_the_keys_online_rate_limit(keyed: Router) -> None:
    """A key of 30 requests a minute runs a batch of 10 lines: about 20 online requests
    are left to it (plus what refills meanwhile: one every 2 s), not 30."""
    metered = sdk(keyed, KEY_METERED)
    batch = _run_batch(metered, _chat_lines("metered", "chat-a", 10))
    assert batch.status == "completed" and batch.request_counts.completed == 10
    ok = 0
    for _ in range(40):
        r = keyed.client.post("/v1/chat/completions", headers={
            "authorization": f"Bearer {KEY_METERED}"}, json={
            "model": "chat-a", "max_tokens": 1, "messages": [{"role": "user", "content": "a"}]})
        if r.status_code == 429:
            break
        assert r.status_code == 200, r.text
        ok += 1
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert 18 <= ok <= 24, f"{ok} online requests passed after a batch of 10 (rpm 30)"


def test_batch_errors_quote_client_values_cut_short(keyed: Router) -> None:
    """A 100,000-character model name and custom_id come back cut to 256 characters."""
    premium = sdk(keyed, KEY_PREMIUM)
    long_id, long_model = "i" * 100_000, "m" * 100_000
    lines = [{"custom_id": long_id, "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "chat-a", "messages": [{"role": "user", "content": "a"}]}},
             {"custom_id": long_id, "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": long_model, "messages": [{"role": "user", "content": "a"}]}},
             {"custom_id": "other", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": long_model, "messages": [{"role": "user", "content": "a"}]}}]
    batch = _run_batch(premium, "\n".join(json.dumps(x) for x in lines).encode())
    assert batch.status == "failed" and batch.errors is not None
    found = {(e.line, e.code): e.message or "" for e in batch.errors.data}
    assert set(found) == {(2, "duplicate_custom_id"), (3, "model_not_available")}
    assert all(len(message) < 400 for message in found.values()), found
    assert "i" * 256 + "…`" in found[(2, "duplicate_custom_id")]
    assert "m" * 256 + "…`" in found[(3, "model_not_available")]
