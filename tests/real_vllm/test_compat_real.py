"""``routeyard compat`` against real vLLM engines: zero differences for every model kind.

Real vLLM (CPU build) from ``scripts/real_vllm/install.sh``, tiny models built locally by
``build_models.py``, engines started together by ``serve.py``, one routeyard router in
front. Run: ``bash scripts/real_vllm/install.sh && pytest -m real_vllm tests/real_vllm -s``.
With ``ROUTEYARD_COMPAT_DOCS=1`` the reports go to docs/compat/<kind>.md (then run
``python -m router.supported_apis`` to refresh the "verified" column).

Outside CI a missing vLLM venv skips; in CI (``CI=true``) it, like any failure to build
the models or start an engine, fails the tier.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from router.compat import run
from router.compat.requests import groups_of
from router.stored_responses import response_id_in
from tests.harness import ROOT, Router, start_router
from tests.real_vllm.serve_script import serve

pytestmark = pytest.mark.real_vllm


@dataclass(frozen=True, slots=True)
class RealKind:
    """A model kind: its compat task, engine (``serve.SPECS`` key), names and groups."""

    kind: str
    task: str
    engine: str
    engine_model: str
    public_model: str
    groups: tuple[str, ...] | None = None  # None: every group of the task's suite

    def enabled(self) -> list[str]:
        return sorted(self.groups or groups_of(self.task))


KINDS = (
    RealKind("chat", "generate", "chat", "tiny-qwen2", "chat"),
    RealKind("embed", "embed", "embed", "minilm", "minilm"),
    RealKind("rerank", "score", "cross", "bert-rerank", "rerank", ("rerank",)),
    RealKind("score", "score", "cross", "bert-score", "bert-score", ("score", "classify")),
    RealKind("transcription", "transcription", "whisper", "tiny-whisper", "whisper"),
)


@pytest.fixture(scope="session")
def real_engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Engine kind → URL of a healthy real vLLM server."""
    vllm = serve.venv() / "bin" / "vllm"
    if not vllm.exists():
        message = f"no vLLM at {vllm}: run `bash scripts/real_vllm/install.sh` first"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    started = time.monotonic()
    models = serve.build_models()
    built = time.monotonic()
    engines = serve.start(models, tmp_path_factory.mktemp("vllm-logs"))
    print(f"\nreal_vllm: models ready in {built - started:.1f} s, "
          f"engines healthy after {time.monotonic() - built:.1f} s "
          f"({', '.join(f'{k} {e.ready_after:.0f} s' for k, e in engines.items())})")
    yield {kind: engine.url for kind, engine in engines.items()}
    serve.stop(engines)


@pytest.fixture(scope="session")
def real_router(real_engines: dict[str, str],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    lines = ["models:"]
    for k in KINDS:
        lines += [f"  {k.public_model}:", "    backends:", f"      - url: {real_engines[k.engine]}",
                  f"    endpoints: [{', '.join(k.enabled())}]"]
        if k.public_model != k.engine_model:
            lines.append(f"    backend_model: {k.engine_model}")
    with start_router(tmp_path_factory.mktemp("real-router"), "\n".join(lines) + "\n") as router:
        yield router


@pytest.mark.parametrize("kind", KINDS, ids=[k.kind for k in KINDS])
def test_compat_has_no_difference_on_real_vllm(
    kind: RealKind, real_engines: dict[str, str], real_router: Router, tmp_path: Path
) -> None:
    to_docs = os.environ.get("ROUTEYARD_COMPAT_DOCS") == "1"
    report = (ROOT / "docs" / "compat" if to_docs else tmp_path) / f"{kind.kind}.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    out = io.StringIO()
    started = time.monotonic()
    code = run(real_engines[kind.engine], real_router.url, kind.public_model, kind.task,
               engine_model=kind.engine_model, groups=kind.groups, markdown=report, out=out)
    print(f"\n{out.getvalue()}compat {kind.kind}: {time.monotonic() - started:.1f} s")
    assert code == 0, out.getvalue()


def test_stored_responses_through_the_router(real_router: Router) -> None:
    """On a real engine (``VLLM_ENABLE_RESPONSES_API_STORE=1``): the router reads the id
    of an answer where ``router.response_ids`` expects it (the body, the first stream
    chunk), and retrieval and follow-ups by id work through it."""
    sdk = openai.OpenAI(base_url=f"{real_router.url}/v1", api_key="unused", max_retries=0)
    body = {"model": "chat", "input": "Hello", "max_output_tokens": 4}
    raw = httpx.post(f"{real_router.url}/v1/responses", json=body, timeout=120)
    assert raw.status_code == 200, raw.text
    made = raw.json()["id"]
    assert response_id_in(raw.content) == made
    with httpx.stream("POST", f"{real_router.url}/v1/responses",
                      json={**body, "stream": True}, timeout=120) as streamed:
        chunks = streamed.iter_raw()
        first = next(chunks)
        rest = b"".join(chunks)
    streamed_id = response_id_in(first)
    assert streamed_id is not None and streamed_id.encode() in rest
    assert sdk.responses.retrieve(made).id == made
    follow = sdk.responses.create(model="chat", input="More", max_output_tokens=4,
                                  previous_response_id=made)
    assert follow.previous_response_id == made
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve("resp_" + "0" * 32)
