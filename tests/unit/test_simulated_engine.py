"""The fake engine with ``--simulate``, over real sockets: chat streams in vLLM's chunk
format paced by the serving model, a shared prefix answers faster the second time, the
queue shows on ``/metrics`` with vLLM's names, and ``/reset_prefix_cache`` forgets."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.fake_engine.serving import token_ids
from tests.harness import Process, free_port, http_ok, python_m, wait_until

MODEL = "sim-model"
SYSTEM = " ".join(f"rule{i}" for i in range(1500))
#: 1,500 uncached prompt tokens take 1.5 s to prefill, a cached prompt a few ms.
SERVING = ("prefill_s_per_token=0.001", "step_base_s=0.002", "step_per_seq_s=0.0001",
           "max_num_seqs=1", "stream_interval=3")


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["--model", MODEL, "--port", str(port), "--simulate"]
    for setting in SERVING:
        args += ["--serving", setting]
    log = tmp_path_factory.mktemp("simulated") / "engine.log"
    with Process(python_m("router.fake_engine", *args), log, ready=http_ok(f"{url}/health")):
        yield url


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def chat(url: str, user: str, tokens: int = 7) -> tuple[float, list[str]]:
    """Stream one chat through the SDK: (seconds to the first chunk, the content deltas)."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    start = time.perf_counter()
    first = 0.0
    deltas = []
    stream = client.chat.completions.create(
        model=MODEL, stream=True, max_tokens=tokens,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}])
    for chunk in stream:
        first = first or time.perf_counter() - start
        assert chunk.object == "chat.completion.chunk" and chunk.model == MODEL
        if chunk.choices and chunk.choices[0].delta.content:
            deltas.append(chunk.choices[0].delta.content)
    return first, deltas


def test_a_cached_system_prompt_answers_sooner_and_the_counters_show_the_hit(
        engine: str) -> None:
    httpx.post(engine + "/reset_prefix_cache").raise_for_status()
    before = metrics(engine)
    cold, deltas = chat(engine, "first question")
    warm, _ = chat(engine, "second question")
    after = metrics(engine)
    assert cold > 1.2 and warm < cold / 3, (cold, warm)
    # 7 tokens in chunks of the first token, then 3 at a time: 1 + 3 + 3
    assert [len(d.split()) for d in deltas] == [1, 3, 3]
    queries = after["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"]
    hits = after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"]
    assert hits >= 1488 and queries > hits
    assert after["vllm:request_success_total"] - before["vllm:request_success_total"] == 2


def test_the_queue_and_the_running_slot_show_on_metrics(engine: str) -> None:
    httpx.post(engine + "/reset_prefix_cache").raise_for_status()
    threads = [threading.Thread(target=chat, args=(engine, f"user {i}", 3)) for i in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: metrics(engine)["vllm:num_requests_waiting"] == 2, 5,
               "two requests wait behind the one slot")
    assert metrics(engine)["vllm:num_requests_running"] == 1
    assert 0 < metrics(engine)["vllm:kv_cache_usage_perc"] <= 1
    for t in threads:
        t.join(30)
    wait_until(lambda: metrics(engine)["vllm:num_requests_running"] == 0, 5, "all done")


def test_reset_prefix_cache_makes_the_next_prompt_cold(engine: str) -> None:
    chat(engine, "warm it")
    assert httpx.post(engine + "/reset_prefix_cache").status_code == 200
    before = metrics(engine)["vllm:prefix_cache_hits_total"]
    chat(engine, "after the reset")
    assert metrics(engine)["vllm:prefix_cache_hits_total"] == before


def test_tokenize_gives_the_serving_models_word_tokens(engine: str) -> None:
    r = httpx.post(engine + "/tokenize", json={"model": MODEL, "prompt": "alpha beta  gamma",
                                                "return_token_strs": True})
    assert r.status_code == 200
    body = r.json()
    assert body["tokens"] == token_ids("alpha beta gamma") and body["count"] == 3
    assert body["token_strs"] == ["alpha", "beta", "gamma"]


def test_the_default_fake_engine_has_no_metrics_and_simulate_needs_generate(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    from router.fake_engine import create_app
    from router.fake_engine.serving import ServingParams

    with pytest.raises(ValueError, match="generate"):
        create_app(["m"], "embed", serving=ServingParams())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("plain") / "engine.log"
    with Process(python_m("router.fake_engine", "--model", MODEL, "--port", str(port)), log,
                 ready=http_ok(f"{url}/health")):
        assert httpx.get(url + "/metrics").status_code == 404
        assert httpx.post(url + "/reset_prefix_cache").status_code == 404
