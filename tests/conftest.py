"""Shared fixtures: real servers on 127.0.0.1 (fake engines by default, real vLLM on demand).

Engines: by default one ``routeyard fake-engine`` per task. To run the same tests against
real engines, set ``ROUTEYARD_TEST_ENGINE_<TASK>=URL`` and ``ROUTEYARD_TEST_MODEL_<KIND>=NAME``
for the tasks GENERATE, EMBED, SCORE, TRANSCRIPTION (kinds: CHAT, EMBED, RERANK, SCORE,
TRANSCRIPTION); tests marked ``fake_only`` (they need the fake engine's knobs) then skip.

Every process a test runs (routers, engines, batch servers, moto, redis-server) is started
and stopped through ``tests/harness.py``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness import FakeEngine, Router, running, start_router, stop_all


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
    urls = {}
    fakes = []
    for task in ("generate", "embed", "score", "transcription"):
        env_url = os.environ.get(f"ROUTEYARD_TEST_ENGINE_{task.upper()}")
        if env_url:
            urls[task] = env_url.rstrip("/")
            continue
        models = [k.engine_model for k in KINDS.values() if k.task == task]
        fakes.append(FakeEngine(task, models, logs / f"engine-{task}.log"))
        urls[task] = fakes[-1].url
    with running(fakes):
        yield urls


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
    with start_router(tmp, routes_yaml(engines, extra)) as r:
        yield r


@pytest.fixture
def launch_router(tmp_path: Path) -> Iterator[Callable[..., Router]]:
    """``launch(text, **options)``: a started router on a routes text (each its own file
    in ``tmp_path``, unless ``config=`` names one); all are stopped at the end of the test.
    ``options`` go to ``Router`` (workers, env, drop_env, every_worker, admin_key)."""
    started: list[Router] = []

    def launch(text: str, *, config: Path | None = None, **options: Any) -> Router:
        if config is None:
            config = tmp_path / ("routes.yaml" if not started else f"routes-{len(started)}.yaml")
            config.write_text(text)
        started.append(start_router(tmp_path, text, config=config, **options))
        return started[-1]

    yield launch
    stop_all(started)


@pytest.fixture
def fake_only() -> None:
    if REAL_ENGINES:
        pytest.skip("needs the fake engine's test knobs")
