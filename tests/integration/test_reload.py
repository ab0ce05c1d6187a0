"""Hot reload: every way a routes file changes, bad edits refused, in-flight requests kept."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import routes_yaml
from tests.harness import Router, sha256, start_router, wait_until


def with_model(engines: dict, name: str) -> str:
    return routes_yaml(engines, f"  {name}:\n    backends:\n      - url: {engines['generate']}\n"
                                f"    endpoints: [chat, tokenize]\n    backend_model: chat-model\n")


def assert_serves(router: Router, model: str) -> None:
    r = router.client.post("/tokenize", json={"model": model, "prompt": "a"})
    assert r.status_code == 200, r.text


@pytest.fixture
def live(engines: dict, launch_router) -> Router:
    return launch_router(routes_yaml(engines))


def test_in_place_write(live: Router, engines: dict) -> None:
    new = with_model(engines, "added-in-place")
    with live.config.open("w") as f:
        f.write(new)
    assert live.wait_for_sha(sha256(new)) < 2
    assert_serves(live, "added-in-place")


def test_write_temp_then_rename(live: Router, engines: dict) -> None:
    new = with_model(engines, "added-by-rename")
    tmp = live.config.with_suffix(".tmp")
    tmp.write_text(new)
    os.replace(tmp, live.config)
    assert live.wait_for_sha(sha256(new)) < 2
    assert_serves(live, "added-by-rename")


def _configmap_dir(root: Path, version: str, text: str) -> None:
    """Lay out a ConfigMap volume the way the kubelet does (AtomicWriter)."""
    data = root / f"..{version}"
    data.mkdir()
    (data / "routes.yaml").write_text(text)
    link = root / "..data_tmp"
    link.symlink_to(data.name)
    os.replace(link, root / "..data")


def test_kubernetes_configmap_symlink_swap(engines: dict, tmp_path: Path) -> None:
    volume = tmp_path / "cm"
    volume.mkdir()
    _configmap_dir(volume, "2026_11_28_v1", routes_yaml(engines))
    (volume / "routes.yaml").symlink_to("..data/routes.yaml")
    with start_router(tmp_path, "", config=volume / "routes.yaml") as router:
        new = with_model(engines, "added-by-configmap")
        _configmap_dir(volume, "2026_11_28_v2", new)
        assert router.wait_for_sha(sha256(new)) < 2
        assert_serves(router, "added-by-configmap")


def test_invalid_edit_is_refused_and_old_config_keeps_serving(live: Router, engines) -> None:
    good = live.config_sha()
    bad = routes_yaml(engines) + "  broken-model:\n    backends: []\n    endpoints: [chat]\n"
    live.config.write_text(bad)
    admin = wait_until(lambda: (a := live.admin())["reloads"]["error"] and a, 3,
                       "the router refuses the edit")
    assert admin["sha256"] == good
    line = bad.splitlines().index("    backends: []") + 1
    assert f"routes.yaml:{line}:" in admin["last_error"]
    assert f"routes.yaml:{line}:" in live.log_text()
    assert_serves(live, "chat-model")
    fixed = with_model(engines, "after-fix")
    live.config.write_text(fixed)
    live.wait_for_sha(sha256(fixed))
    assert live.admin()["last_error"] is None


def test_stream_in_flight_finishes_on_its_config(live: Router, engines, fake_only) -> None:
    result: dict = {}
    streaming = threading.Event()

    def stream() -> None:
        body = {"model": "chat-model", "messages": [{"role": "user", "content": "a"}],
                "stream": True, "max_tokens": 20}
        # 20 tokens 100 ms apart: about two seconds, a reload takes a few hundred ms.
        with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, timeout=30,
                          headers={"x-fake-token-delay-ms": "100", "x-fake-tokens": "20"}) as r:
            chunks = []
            for chunk in r.iter_raw():
                chunks.append(chunk)
                streaming.set()
            result["text"] = b"".join(chunks).decode()

    thread = threading.Thread(target=stream)
    thread.start()
    assert streaming.wait(10), "the stream never started"
    # The new config drops chat-model entirely.
    new = with_model(engines, "other").replace("  chat-model:", "  renamed-chat:")
    live.config.write_text(new)
    live.wait_for_sha(sha256(new))
    assert thread.is_alive(), "the stream ended before the reload: nothing was in flight"
    thread.join(10)
    events = [e for e in result["text"].split("\n\n") if e.strip()]
    assert len(events) >= 22  # role chunk, 20 token chunks, [DONE]
    assert '"finish_reason":"length"' in result["text"].replace(" ", "")
    assert events[-1] == "data: [DONE]"
    r = live.client.post("/tokenize", json={"model": "chat-model", "prompt": "a"})
    assert r.status_code == 404


def test_sighup_reloads(engines: dict, launch_router) -> None:
    text = routes_yaml(engines)
    router = launch_router(text, env={"ROUTEYARD_WATCH": "false"})
    # A watching router on the same file: it shows when a watcher would have seen the edit.
    watching = launch_router("", config=router.config)
    new = with_model(engines, "added-by-sighup")
    router.config.write_text(new)
    watching.wait_for_sha(sha256(new))
    assert router.config_sha() == sha256(text)  # nothing watches the file here
    assert router.admin()["reloads"] == {"ok": 0, "error": 0, "unchanged": 0}
    router.signal(signal.SIGHUP)
    router.wait_for_sha(sha256(new))
    assert_serves(router, "added-by-sighup")


def _every_worker_serves(router: Router, expected: str) -> None:
    wait_until(lambda: {router.fresh_admin()["sha256"] for _ in range(30)} == {expected}, 3,
               "every worker serves the new config")


def _every_watcher_armed(router: Router, text: str) -> None:
    """Until each worker's watcher has reloaded the file once (unchanged): rewrite the
    same text now and then, and tell the workers apart by ``pid``."""
    unchanged: dict[int, int] = {}
    writes: list[float] = []

    def armed() -> bool:
        if not writes or time.monotonic() - writes[-1] > 0.5:
            router.config.write_text(text)
            writes.append(time.monotonic())
        view = router.fresh_admin()
        unchanged[view["pid"]] = view["reloads"]["unchanged"]
        return len(unchanged) == router.workers and all(unchanged.values())

    wait_until(armed, 10, "every worker's watcher reloads an unchanged file")


@pytest.mark.parametrize("trigger", ["watch", "sighup"])
def test_every_worker_reloads(engines: dict, launch_router, trigger: str) -> None:
    text = routes_yaml(engines)
    env = {"ROUTEYARD_WATCH": "false"} if trigger == "sighup" else {}
    router = launch_router(text, workers=2, env=env)  # ready: both workers answered
    if trigger == "watch":
        _every_watcher_armed(router, text)
    new = with_model(engines, f"added-{trigger}")
    router.config.write_text(new)
    if trigger == "sighup":
        router.signal(signal.SIGHUP)
    _every_worker_serves(router, sha256(new))
