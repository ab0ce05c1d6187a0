"""The admin surface of a real router over fake engines: engines checked for the model
names routeyard sends, admin state that is current, ISO-8601 times, the status page's key
rule, and key ids and limits in ``/admin/config``."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from router.tenants.config import hash_key
from tests.harness import FakeEngine, Router, wait_until

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
def engine(tmp_path: Path, fake_only: None) -> Iterator[FakeEngine]:
    """A fake engine of this test's own, serving ``base`` only (tests may restart it)."""
    fake = FakeEngine("generate", ["base"], tmp_path / "engine.log")
    fake.start()
    yield fake
    fake.stop()


def two_models(engine: FakeEngine, extra: str = "") -> str:
    """``base`` (served) and ``adapter`` (sent as ``lora-sql``) on one engine."""
    return f"""\
defaults:
  endpoints: [chat]
  health_checks: {{interval: 200ms, timeout: 1s, unhealthy_threshold: 1}}
models:
  base:
    backends: [{{url: "{engine.url}"}}]
  adapter:
    backends: [{{url: "{engine.url}"}}]
    backend_model: lora-sql
{extra}"""


def backend(router: Router, model: str) -> dict:
    (entry,) = router.backends(model)
    return entry


def test_a_backend_not_serving_the_name_sent_is_down_for_that_model_until_it_does(
        engine: FakeEngine, launch_router: Callable[..., Router]) -> None:
    router = launch_router(two_models(engine))
    entry = wait_until(lambda: (e := backend(router, "adapter"))["state"] == "unhealthy" and e,
                       5, "adapter's backend marked unhealthy")
    assert entry["up"] is False and entry["model_served"] is False
    assert entry["last_error"] == "model lora-sql not served (engine serves: base)"
    assert backend(router, "base")["state"] == "healthy"
    ready = router.client.get("/ready", params={"models": "all"})
    assert ready.status_code == 503
    assert ready.json()["models_without_backend"] == ["adapter"]
    assert router.client.get("/ready", params={"models": "any"}).status_code == 200
    refused = router.client.post("/v1/chat/completions", json={"model": "adapter", **CHAT})
    assert refused.status_code == 503, refused.text  # the router's answer, not the engine's 404
    assert refused.json()["error"]["code"] == "no_healthy_backend"
    served = router.client.post("/v1/chat/completions", json={"model": "base", **CHAT})
    assert served.status_code == 200, served.text
    # Asked again at every check while the name is missing; logged once.
    asked = engine.count("/v1/models")
    wait_until(lambda: engine.count("/v1/models") >= asked + 3, 5, "three more model checks")
    assert router.log_text().count("model lora-sql not served") == 1
    assert re.search(r"WARNING.*model lora-sql not served", router.log_text())

    engine.models.append("lora-sql")  # the engine restarts serving the adapter too
    engine.restart()
    wait_until(lambda: backend(router, "adapter")["state"] == "healthy", 5,
               "adapter's backend back")
    entry = backend(router, "adapter")
    assert entry["last_error"] is None and entry["model_served"] is True
    assert router.client.get("/ready", params={"models": "all"}).status_code == 200
    again = router.client.post("/v1/chat/completions", json={"model": "adapter", **CHAT})
    assert again.status_code == 200, again.text
    assert re.search(r"INFO.*backend \S+ serves model lora-sql again", router.log_text())


def test_an_engine_without_a_model_list_is_not_marked_down(
        tmp_path: Path, launch_router: Callable[..., Router], fake_only: None) -> None:
    """A backend answering 404 on /v1/models (not vLLM: the fake engine's ``/_fake``
    prefix, whose ``/requests`` stands in for ``/health``) is judged by /health alone."""
    plain = FakeEngine("generate", ["base"], tmp_path / "engine.log")
    with plain:
        text = f"""\
models:
  other:
    backends: [{{url: "{plain.url}/_fake"}}]
    endpoints: [chat]
    backend_model: not-listed
defaults:
  health_checks: {{interval: 200ms, path: /requests}}
"""
        router = launch_router(text)
        wait_until(lambda: plain.count("/_fake/v1/models") >= 2, 5, "two model checks")
        entry = backend(router, "other")
        assert (entry["state"], entry["model_served"], entry["last_error"]) == (
            "healthy", None, None)
        assert router.client.get("/ready").status_code == 200


def test_counters_and_reason_clear_when_a_backend_recovers(
        engine: FakeEngine, launch_router: Callable[..., Router]) -> None:
    router = launch_router(two_models(engine))
    wait_until(lambda: backend(router, "base")["last_check"], 5, "a first check")
    engine.kill()
    failed = router.client.post("/v1/chat/completions", json={"model": "base", **CHAT})
    assert failed.status_code in (502, 503)
    down = wait_until(lambda: (e := backend(router, "base"))["state"] == "unhealthy" and e, 5,
                      "base unhealthy")
    assert down["consecutive_failures"] >= 1 and down["last_error"]
    assert ISO.match(down["last_check"])
    engine.start()
    wait_until(lambda: backend(router, "base")["state"] == "healthy", 5, "base back")
    up = backend(router, "base")
    assert (up["consecutive_failures"], up["consecutive_5xx"], up["last_error"]) == (0, 0, None)
    assert re.search(r"INFO.*backend \S+ is healthy again", router.log_text())
    assert re.search(r"WARNING.*backend \S+ is now unhealthy", router.log_text())


def test_a_revert_to_the_last_good_file_clears_last_error(
        engine: FakeEngine, launch_router: Callable[..., Router]) -> None:
    good = two_models(engine)
    router = launch_router(good)
    router.config.write_text(good + "  broken:\n    backends: []\n")
    wait_until(lambda: router.admin()["last_error"], 5, "the edit refused")
    router.config.write_text(good)
    wait_until(lambda: router.admin()["reloads"]["unchanged"] >= 1, 5, "the revert seen")
    admin = router.admin()
    assert admin["last_error"] is None
    results = [r["result"] for r in admin["recent_reloads"]]
    assert results[0] == "start" and "error" in results and results[-1] == "unchanged"
    assert all(ISO.match(r["at"]) for r in admin["recent_reloads"])
    assert ISO.match(admin["loaded_at"])


def test_the_status_page_and_config_need_an_admin_key_and_show_key_ids(
        engine: FakeEngine, launch_router: Callable[..., Router]) -> None:
    extra = f"""\
auth:
  keys:
    - id: team-a
      hash: "{hash_key('sk-team-a')}"
      models: [base]
      limits: {{rpm: 60}}
  admin_keys:
    - id: ops
      hash: "{hash_key('sk-ops')}"
"""
    router = launch_router(two_models(engine, extra), admin_key="sk-ops")
    client = router.client
    assert client.get("/admin/status").status_code == 401
    refused = client.get("/admin/status", headers={"authorization": "Bearer sk-team-a"})
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "admin_key_required"
    assert client.get("/admin/status", params={"key": "sk-ops"}).status_code == 401
    page = client.get("/admin/status", headers={"authorization": "Bearer sk-ops"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "base" in page.text and engine.url in page.text
    auth = router.admin()["auth"]
    assert auth["admin_keys"] == ["ops"]
    assert [(k["id"], k["models"], k["limits"]["rpm"]) for k in auth["keys"]] == [
        ("team-a", ["base"], 60)]


def test_the_status_page_lists_batches_when_batch_is_on(
        engine: FakeEngine, launch_router: Callable[..., Router], tmp_path: Path) -> None:
    batch = f"""\
batch:
  database_url: sqlite+aiosqlite:///{tmp_path}/batch.db
  storage: {{url: "{tmp_path}/files"}}
  workers: 0
"""
    router = launch_router(two_models(engine, batch))  # no batch worker: batches wait
    upload = router.client.post("/v1/files", data={"purpose": "batch"}, files={
        "file": ("in.jsonl", b'{"custom_id": "a", "method": "POST", "url": '
                             b'"/v1/chat/completions", "body": {"model": "base", '
                             b'"messages": [{"role": "user", "content": "hi"}]}}\n')})
    assert upload.status_code == 200, upload.text
    made = router.client.post("/v1/batches", json={
        "input_file_id": upload.json()["id"], "endpoint": "/v1/chat/completions",
        "completion_window": "24h"})
    assert made.status_code == 200, made.text
    page = router.client.get("/admin/status").text
    assert "Batches in progress" in page
    row = page.split(made.json()["id"], 1)[1].split("</tr>", 1)[0]
    assert '<span class="validating">validating</span>' in row and "0 of 0" in row
