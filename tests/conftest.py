"""Shared fixtures: real servers on 127.0.0.1 (fake engines by default, real vLLM on demand).

Engines: by default one ``routeyard fake-engine`` per task. To run the same tests against
real engines, set ``ROUTEYARD_TEST_ENGINE_<TASK>=URL`` and ``ROUTEYARD_TEST_MODEL_<KIND>=NAME``
for the tasks GENERATE, EMBED, SCORE, TRANSCRIPTION (kinds: CHAT, EMBED, RERANK, SCORE,
TRANSCRIPTION); tests marked ``fake_only`` (they need the fake engine's knobs) then skip.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} not healthy after {timeout}s")


def start(args: list[str], health_url: str, log: Path) -> subprocess.Popen:
    out = log.open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "router.cli", *args],
        stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
    )
    try:
        wait_healthy(health_url, proc)
    except RuntimeError:
        stop(proc)
        raise RuntimeError(f"{args} failed to start:\n{log.read_text()[-3000:]}") from None
    return proc


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@dataclass
class Kind:
    """One model kind of the test config: its public name, engine and enabled groups."""

    name: str
    task: str
    engine_model: str
    groups: tuple[str, ...]


KINDS = {
    "chat": Kind("chat-model", "generate", "chat-model",
                 ("chat", "completions", "responses", "messages", "tokenize")),
    "embed": Kind("embed-model", "embed", "embed-model", ("embeddings", "pooling", "tokenize")),
    "rerank": Kind("rerank-model", "score", "rerank-model", ("rerank",)),
    "score": Kind("score-model", "score", "score-model", ("score", "classify")),
    "transcription": Kind("whisper-model", "transcription", "whisper-model",
                          ("transcription", "translation")),
}
for _kind, _spec in KINDS.items():
    _spec.engine_model = os.environ.get(f"ROUTEYARD_TEST_MODEL_{_kind.upper()}", _spec.engine_model)

REAL_ENGINES = any(k.startswith("ROUTEYARD_TEST_ENGINE_") for k in os.environ)


@pytest.fixture(scope="session")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def engines(logs: Path) -> Iterator[dict[str, str]]:
    """Task → engine URL; fake engines unless ``ROUTEYARD_TEST_ENGINE_<TASK>`` is set."""
    procs = []
    urls = {}
    for task in ("generate", "embed", "score", "transcription"):
        env_url = os.environ.get(f"ROUTEYARD_TEST_ENGINE_{task.upper()}")
        if env_url:
            urls[task] = env_url.rstrip("/")
            continue
        port = free_port()
        models = [k.engine_model for k in KINDS.values() if k.task == task]
        args = ["fake-engine", "--task", task, "--port", str(port)]
        for model in models:
            args += ["--model", model]
        urls[task] = f"http://127.0.0.1:{port}"
        procs.append(start(args, f"{urls[task]}/health", logs / f"engine-{task}.log"))
    yield urls
    for proc in procs:
        stop(proc)


def routes_yaml(engines: dict[str, str], extra: str = "", **overrides: str) -> str:
    """The test routes file: the five model kinds, plus ``extra`` YAML under models."""
    lines = ["models:"]
    for kind in KINDS.values():
        lines += [
            f"  {kind.name}:",
            "    backends:",
            f"      - url: {overrides.get(kind.name, engines[kind.task])}",
            f"    endpoints: [{', '.join(kind.groups)}]",
        ]
        if kind.engine_model != kind.name:
            lines.append(f"    backend_model: {kind.engine_model}")
    return "\n".join(lines) + "\n" + extra


@dataclass
class Router:
    url: str
    config: Path
    proc: subprocess.Popen
    log: Path
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def config_sha(self) -> str:
        return self.client.get("/admin/config").json()["sha256"]

    def admin(self) -> dict:
        return self.client.get("/admin/config").json()

    def wait_for_sha(self, sha: str, timeout: float = 2.0) -> float:
        """Seconds until the router serves config ``sha``; fails after ``timeout``."""
        start_t = time.monotonic()
        while time.monotonic() - start_t < timeout:
            if self.config_sha() == sha:
                return time.monotonic() - start_t
            time.sleep(0.02)
        raise AssertionError(f"router did not load config {sha[:12]} within {timeout}s")


def start_router(
    tmp_path: Path, text: str, *, workers: int = 1, config: Path | None = None
) -> Router:
    if config is None:
        config = tmp_path / "routes.yaml"
        config.write_text(text)
    port = free_port()
    log = tmp_path / f"router-{port}.log"
    args = ["serve", "--config", str(config), "--port", str(port), "--workers", str(workers)]
    proc = start(args, f"http://127.0.0.1:{port}/health", log)
    return Router(f"http://127.0.0.1:{port}", config, proc, log)


@pytest.fixture(scope="session")
def dead_port() -> Iterator[int]:
    """A port that refuses connections for the whole session: bound, never listening,
    so no other server can take it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture(scope="session")
def router(
    engines: dict[str, str], dead_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Router]:
    """One shared router over the five model kinds (tests must not change its config)."""
    tmp = tmp_path_factory.mktemp("router")
    extra = (
        "  tiny-body-model:\n    backends:\n"
        f"      - url: {engines['generate']}\n"
        "    endpoints: [chat]\n    backend_model: chat-model\n    max_body_size: 1KiB\n"
        "  dead-model:\n    backends:\n"
        f"      - url: http://127.0.0.1:{dead_port}\n    endpoints: [chat]\n"
        "  slow-model:\n    backends:\n"
        f"      - url: {engines['generate']}\n    endpoints: [chat]\n"
        "    backend_model: chat-model\n    timeouts: {first_byte: 500ms}\n"
    )
    r = start_router(tmp, routes_yaml(engines, extra))
    yield r
    stop(r.proc)


@pytest.fixture
def fake_only() -> None:
    if REAL_ENGINES:
        pytest.skip("needs the fake engine's test knobs")
