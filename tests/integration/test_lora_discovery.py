"""``discover: true`` through a real router process over two fake engines: the LoRA
adapters the engines list in ``/v1/models`` (with ``parent``) are listed by the router and
routed, each only to the engines that list it now; loading and unloading one at runtime
(``/_fake/load_lora``, ``/_fake/unload_lora``) moves its traffic within a health-check
interval; the base model's allowlist and a key's model patterns apply to adapters."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from router.tenants.config import hash_key
from tests.harness import FakeEngine, Router, running, start_router, wait_until

BASE = "Qwen/Qwen3"
CHAT = "/v1/chat/completions"
#: The router reads each engine's /v1/models at every health check, this often.
INTERVAL = 1.0
#: Deadline for a change to show: an interval, and slack for a loaded shared machine (well
#: under the 12 intervals after which a model without ``discover`` would read it again).
WITHIN = 4.0
KEY_ALL, KEY_QWEN, KEY_POEM, KEY_ADMIN = "sk-all-models", "sk-qwen-only", "sk-poem", "sk-ops"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Router, FakeEngine,
                                                                         FakeEngine]]:
    tmp = tmp_path_factory.mktemp("lora-discovery")
    a = FakeEngine("generate", [BASE], tmp / "engine-a.log", loras=["poem", "qwen-poem"])
    b = FakeEngine("generate", [BASE], tmp / "engine-b.log")
    with running([a, b]):
        text = f"""\
defaults:
  health_checks: {{interval: {int(INTERVAL * 1000)}ms, timeout: 2s}}
auth:
  keys:
    - {{id: all, hash: "{hash_key(KEY_ALL)}", models: ["*"]}}
    - {{id: qwen-only, hash: "{hash_key(KEY_QWEN)}", models: ["qwen*"]}}
    - {{id: poem-only, hash: "{hash_key(KEY_POEM)}", models: [poem]}}
  admin_keys:
    - {{id: ops, hash: "{hash_key(KEY_ADMIN)}"}}
models:
  qwen:
    backend_model: {BASE}
    discover: true
    endpoints: [chat, responses]
    backends:
      - {{url: "{a.url}", name: a}}
      - {{url: "{b.url}", name: b}}
"""
        with start_router(tmp, text, admin_key=KEY_ADMIN) as router:
            wait_until(lambda: "poem" in listed(router), WITHIN, "the adapters are discovered")
            yield router, a, b


def headers(key: str = KEY_ALL) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def listed(router: Router, key: str = KEY_ALL) -> dict[str, dict[str, object]]:
    response = router.client.get("/v1/models", headers=headers(key))
    assert response.status_code == 200, response.text
    return {card["id"]: card for card in response.json()["data"]}


def ask(router: Router, model: str, key: str = KEY_ALL, path: str = CHAT) -> httpx.Response:
    body = ({"model": model, "messages": [{"role": "user", "content": "hi"}]} if path == CHAT
            else {"model": model, "prompt": "hi"})
    return router.client.post(path, json=body, headers=headers(key))


def answered_by(router: Router, a: FakeEngine, b: FakeEngine, model: str,
                n: int) -> tuple[int, int]:
    """Send ``n`` chat requests for ``model`` (each answered 200); how many reached A, B."""
    before = a.count(CHAT), b.count(CHAT)
    for _ in range(n):
        response = ask(router, model)
        assert response.status_code == 200, response.text
    return a.count(CHAT) - before[0], b.count(CHAT) - before[1]


def test_models_lists_the_adapters_with_their_parent(
        stack: tuple[Router, FakeEngine, FakeEngine]) -> None:
    router, _, _ = stack
    cards = listed(router)
    assert list(cards) == ["qwen", "poem", "qwen-poem"]
    assert {k: cards["poem"][k] for k in ("object", "owned_by", "root", "parent")} == {
        "object": "model", "owned_by": "routeyard", "root": "/fake/loras/poem",
        "parent": "qwen"}
    assert "parent" not in cards["qwen"]
    view = router._get("/admin/backends")["qwen"]
    assert view["adapters"] == {"poem": ["a"], "qwen-poem": ["a"]}


def test_an_adapter_request_reaches_only_the_engine_that_lists_it(
        stack: tuple[Router, FakeEngine, FakeEngine]) -> None:
    router, a, b = stack
    assert answered_by(router, a, b, "poem", 6) == (6, 0)
    assert ask(router, "poem").json()["model"] == "poem"
    sent = a.requests(CHAT)[-1]
    assert sent["json"]["model"] == "poem"  # the adapter's id, not the base's name
    # The base model still uses both engines.
    assert answered_by(router, a, b, "qwen", 4) == (2, 2)


def test_an_adapter_loaded_then_unloaded_at_runtime_follows_the_engines(
        stack: tuple[Router, FakeEngine, FakeEngine]) -> None:
    router, a, b = stack
    refused = ask(router, "sql")
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
    a.load_lora("sql")
    wait_until(lambda: ask(router, "sql").status_code == 200, WITHIN, "sql routed once loaded")
    assert "sql" in listed(router)
    assert answered_by(router, a, b, "sql", 4) == (4, 0)
    b.load_lora("sql")
    wait_until(lambda: answered_by(router, a, b, "sql", 4) == (2, 2), WITHIN,
               "both engines get sql once B has it too")
    a.unload_lora("sql")  # until the router reads that, A answers vLLM's 404: not counted

    def only_b() -> bool:
        before = a.count(CHAT), b.count(CHAT)
        answers = [ask(router, "sql").status_code for _ in range(4)]
        return (answers == [200] * 4 and a.count(CHAT) == before[0]
                and b.count(CHAT) == before[1] + 4)

    wait_until(only_b, WITHIN, "sql goes only to B once A unloaded it")
    b.unload_lora("sql")

    def gone() -> bool:
        answer = ask(router, "sql")
        return (answer.status_code == 404 and answer.json()["error"]["code"]
                == "model_not_found" and "sql" not in listed(router))

    wait_until(gone, WITHIN, "sql is not found once no engine lists it")


def test_the_base_models_allowlist_applies_to_its_adapters(
        stack: tuple[Router, FakeEngine, FakeEngine]) -> None:
    router, a, _ = stack
    before = a.count("/v1/completions")
    refused = ask(router, "poem", path="/v1/completions")
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["code"] == "endpoint_not_enabled"
    assert ask(router, "qwen", path="/v1/completions").status_code == 403
    assert a.count("/v1/completions") == before


def test_a_keys_model_patterns_apply_to_adapter_names(
        stack: tuple[Router, FakeEngine, FakeEngine]) -> None:
    router, _, _ = stack
    assert list(listed(router, KEY_QWEN)) == ["qwen", "qwen-poem"]
    hidden = ask(router, "poem", KEY_QWEN)
    assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "model_not_found"
    assert ask(router, "qwen-poem", KEY_QWEN).status_code == 200
    assert ask(router, "poem", KEY_ALL).status_code == 200


def test_adapters_of_a_model_without_discover_are_not_routed(
        stack: tuple[Router, FakeEngine, FakeEngine], tmp_path: Path) -> None:
    _, a, _ = stack
    text = f"""\
defaults:
  health_checks: {{interval: {int(INTERVAL * 1000)}ms}}
models:
  qwen:
    backend_model: {BASE}
    endpoints: [chat]
    backends: [{{url: "{a.url}"}}]
"""
    with start_router(tmp_path, text) as plain:
        plain.wait_healthy_backends("qwen")
        assert [c["id"] for c in plain.client.get("/v1/models").json()["data"]] == ["qwen"]
        answer = plain.client.post(CHAT, json={"model": "poem", "messages": []})
        assert answer.status_code == 404


def test_a_stored_answer_of_an_adapter_is_found_with_a_key_for_that_adapter_only(
        stack: tuple[Router, FakeEngine, FakeEngine]) -> None:
    router, a, b = stack
    made = router.client.post("/v1/responses", headers=headers(KEY_POEM),
                              json={"model": "poem", "input": "hi", "store": True})
    assert made.status_code == 200, made.text
    response_id = made.json()["id"]
    path = f"/v1/responses/{response_id}"
    found = router.client.get(path, headers=headers(KEY_POEM))
    assert found.status_code == 200, found.text
    assert found.json()["id"] == response_id
    assert [r["path"] for r in a.requests(path)] == [path] and b.count(path) == 0
