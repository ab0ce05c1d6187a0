"""Hot reload: every way a routes file changes, bad edits refused, in-flight requests kept."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import Router, routes_yaml, start_router, stop


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def with_model(engines: dict, name: str) -> str:
    return routes_yaml(engines, f"  {name}:\n    backends:\n      - url: {engines['generate']}\n"
                                f"    endpoints: [chat, tokenize]\n    backend_model: chat-model\n")


def assert_serves(router: Router, model: str) -> None:
    r = router.client.post("/tokenize", json={"model": model, "prompt": "a"})
    assert r.status_code == 200, r.text


@pytest.fixture
def live(engines: dict, tmp_path: Path):
    router = start_router(tmp_path, routes_yaml(engines))
    yield router
    stop(router.proc)


def test_in_place_write(live: Router, engines: dict) -> None:
    new = with_model(engines, "added-in-place")
    with live.config.open("w") as f:
        f.write(new)
    assert live.wait_for_sha(sha(new)) < 2
    assert_serves(live, "added-in-place")


def test_write_temp_then_rename(live: Router, engines: dict) -> None:
    new = with_model(engines, "added-by-rename")
    tmp = live.config.with_suffix(".tmp")
    tmp.write_text(new)
    os.replace(tmp, live.config)
    assert live.wait_for_sha(sha(new)) < 2
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
    router = start_router(tmp_path, "", config=volume / "routes.yaml")
    try:
        new = with_model(engines, "added-by-configmap")
        _configmap_dir(volume, "2026_11_28_v2", new)
        assert router.wait_for_sha(sha(new)) < 2
        assert_serves(router, "added-by-configmap")
    finally:
        stop(router.proc)


def test_invalid_edit_is_refused_and_old_config_keeps_serving(live: Router, engines) -> None:
    good = live.config_sha()
    bad = routes_yaml(engines) + "  broken-model:\n    backends: []\n    endpoints: [chat]\n"
    live.config.write_text(bad)
    deadline = time.monotonic() + 3
    while live.admin()["reloads"]["error"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    admin = live.admin()
    assert admin["sha256"] == good
    line = bad.splitlines().index("    backends: []") + 1
    assert f"routes.yaml:{line}:" in admin["last_error"]
    assert f"routes.yaml:{line}:" in live.log.read_text()
    assert_serves(live, "chat-model")
    fixed = with_model(engines, "after-fix")
    live.config.write_text(fixed)
    live.wait_for_sha(sha(fixed))
    assert live.admin()["last_error"] is None


def test_stream_in_flight_finishes_on_its_config(live: Router, engines, fake_only) -> None:
    result: dict = {}

    def stream() -> None:
        body = {"model": "chat-model", "messages": [{"role": "user", "content": "a"}],
                "stream": True, "max_tokens": 20}
        with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, timeout=30,
                          headers={"x-fake-token-delay-ms": "50", "x-fake-tokens": "20"}) as r:
            result["text"] = b"".join(r.iter_raw()).decode()

    thread = threading.Thread(target=stream)
    thread.start()
    time.sleep(0.3)
    # The new config drops chat-model entirely.
    new = with_model(engines, "other").replace("  chat-model:", "  renamed-chat:")
    live.config.write_text(new)
    live.wait_for_sha(sha(new))
    thread.join(10)
    events = [e for e in result["text"].split("\n\n") if e.strip()]
    assert len(events) >= 22  # role chunk, 20 token chunks, [DONE]
    assert '"finish_reason":"length"' in result["text"].replace(" ", "")
    assert events[-1] == "data: [DONE]"
    r = live.client.post("/tokenize", json={"model": "chat-model", "prompt": "a"})
    assert r.status_code == 404


def test_sighup_reloads(engines: dict, tmp_path: Path) -> None:
    os.environ["ROUTEYARD_WATCH"] = "false"
    try:
        router = start_router(tmp_path, routes_yaml(engines))
    finally:
        del os.environ["ROUTEYARD_WATCH"]
    try:
        new = with_model(engines, "added-by-sighup")
        router.config.write_text(new)
        time.sleep(0.5)
        assert router.config_sha() != sha(new)  # nothing watches the file here
        os.kill(router.proc.pid, signal.SIGHUP)
        router.wait_for_sha(sha(new))
        assert_serves(router, "added-by-sighup")
    finally:
        stop(router.proc)


def _every_worker_serves(router: Router, expected: str) -> None:
    deadline = time.monotonic() + 3
    while True:
        seen = {httpx.get(f"{router.url}/admin/config",
                          headers={"connection": "close"}).json()["sha256"] for _ in range(30)}
        if seen == {expected}:
            return
        assert time.monotonic() < deadline, f"workers still on {seen}"
        time.sleep(0.05)


@pytest.mark.parametrize("trigger", ["watch", "sighup"])
def test_every_worker_reloads(engines: dict, tmp_path: Path, trigger: str) -> None:
    if trigger == "sighup":
        os.environ["ROUTEYARD_WATCH"] = "false"
    try:
        router = start_router(tmp_path, routes_yaml(engines), workers=2)
    finally:
        os.environ.pop("ROUTEYARD_WATCH", None)
    try:
        time.sleep(1)  # both workers up
        new = with_model(engines, f"added-{trigger}")
        router.config.write_text(new)
        if trigger == "sighup":
            os.kill(router.proc.pid, signal.SIGHUP)
        _every_worker_serves(router, sha(new))
    finally:
        stop(router.proc)
