"""Discovery on a real vLLM engine (CPU build) with LoRA: the router lists the engine's
models and adapters, and an adapter request reaches only the backend that has it loaded.

One ``vllm serve`` of the tiny chat model with ``--enable-lora`` and an adapter loaded at
start (``scripts/real_vllm/make_lora.py``: PEFT's format, written without peft), runtime
loading on (``VLLM_ALLOW_RUNTIME_LORA_UPDATING``); beside it a fake engine serving the same
base name and no adapter. Both are backends of one ``discover: true`` model.

Run: ``bash scripts/real_vllm/install.sh && pytest -m real_vllm tests/real_vllm -s``.
Outside CI a missing vLLM venv skips; in CI (``CI=true``) it fails the tier.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import ROOT, FakeEngine, Router, running, start_router, wait_until
from tests.real_vllm.serve_script import serve

pytestmark = pytest.mark.real_vllm

MODEL = "tiny-qwen2"
CHAT = "/v1/chat/completions"
INTERVAL = 1.0
#: An interval, and slack for a loaded two-core machine.
WITHIN = 10.0


def make_adapter(out: Path, base: Path, seed: int) -> Path:
    python = serve.venv() / "bin" / "python"
    subprocess.run([str(python), str(ROOT / "scripts" / "real_vllm" / "make_lora.py"),
                    str(out), str(base), str(seed)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Router, str, FakeEngine,
                                                                         Path]]:
    vllm = serve.venv() / "bin" / "vllm"
    if not vllm.exists():
        message = f"no vLLM at {vllm}: run `bash scripts/real_vllm/install.sh` first"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    tmp = tmp_path_factory.mktemp("vllm-lora")
    models = serve.build_models()
    sql = make_adapter(tmp / "sql", models["chat"], 1)
    poem = make_adapter(tmp / "poem", models["chat"], 2)
    chat = serve.SPECS["chat"]
    spec = serve.Spec("chat", chat.names, (
        *chat.flags, "--enable-lora", "--max-lora-rank", "8", "--max-loras", "2",
        "--lora-modules", f"sql={sql}"), kv_cache_bytes=64 * 1024 * 1024,
        env=(("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True"),))
    engine = serve.launch(spec, models["chat"], tmp)
    engines = {"chat": engine}
    try:
        deadline = time.monotonic() + 600
        while not serve.healthy(engine.url):
            if engine.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve with LoRA not healthy:\n{serve.tail(engine.log)}")
            time.sleep(0.5)
        fake = FakeEngine("generate", [MODEL], tmp / "fake.log")
        with running([fake]):
            text = f"""\
defaults:
  health_checks: {{interval: {int(INTERVAL * 1000)}ms, timeout: 5s}}
models:
  tiny:
    backend_model: {MODEL}
    discover: true
    endpoints: [chat]
    timeouts: {{first_byte: 120s}}
    backends:
      - {{url: "{engine.url}", name: vllm}}
      - {{url: "{fake.url}", name: fake}}
"""
            with start_router(tmp, text) as router:
                yield router, engine.url, fake, poem
    finally:
        serve.stop(engines)


def listed(router: Router) -> dict[str, dict[str, object]]:
    return {c["id"]: c for c in router.client.get("/v1/models").json()["data"]}


def successes(engine_url: str) -> float:
    """The engine's own count of finished requests (``vllm:request_success_total``)."""
    text = httpx.get(f"{engine_url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total{"))


def ask(router: Router, model: str) -> httpx.Response:
    return router.client.post(CHAT, timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})


def test_discovery_lists_the_engines_models_and_routes_an_adapter_only_where_loaded(
        stack: tuple[Router, str, FakeEngine, Path]) -> None:
    router, vllm_url, fake, poem = stack
    wait_until(lambda: "sql" in listed(router), WITHIN, "the engine's adapter is discovered")
    cards = listed(router)
    assert list(cards) == ["tiny", "sql"]
    assert cards["sql"]["parent"] == "tiny" and str(cards["sql"]["root"]).endswith("/sql")
    before_vllm, before_fake = successes(vllm_url), fake.count(CHAT)
    for _ in range(4):
        answer = ask(router, "sql")
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == "sql"
    assert successes(vllm_url) - before_vllm == 4
    assert fake.count(CHAT) == before_fake  # the fake engine has no sql: it got none
    # Loaded at runtime through vLLM's own API: routed within an interval.
    loaded = httpx.post(f"{vllm_url}/v1/load_lora_adapter", timeout=120,
                        json={"lora_name": "poem", "lora_path": str(poem)})
    assert loaded.status_code == 200, loaded.text
    wait_until(lambda: ask(router, "poem").status_code == 200, WITHIN, "poem routed")
    assert fake.count(CHAT) == before_fake
    unloaded = httpx.post(f"{vllm_url}/v1/unload_lora_adapter", timeout=120,
                          json={"lora_name": "sql"})
    assert unloaded.status_code == 200, unloaded.text

    def gone() -> bool:
        answer = ask(router, "sql")
        return (answer.status_code == 404
                and answer.json()["error"]["code"] == "model_not_found")

    wait_until(gone, WITHIN, "sql not found by the router once vLLM unloaded it")
    assert list(listed(router)) == ["tiny", "poem"]
