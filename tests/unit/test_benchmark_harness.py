"""The benchmark's own parts: the fast engine speaks vLLM's formats (and is an OTLP sink),
wrk's report is read right, the default rows are there, and a broken run is reported.

The whole command runs in ``.ci/run`` after the test tiers (it needs wrk); these tests keep
its parts honest without it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from benchmarks import stream_client, wrk
from benchmarks.results import ChatSample, Results
from benchmarks.targets import MODEL, ROUTEYARD_CMD, SCORED_POLICIES, build, write_routes
from router.config import load_file
from router.engine_load import EngineReading, parse_engine_metrics
from tests.harness import Process, Router, free_port, http_ok, python_m, wait_until


@pytest.fixture(scope="module")
def fast_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    engine = Process(python_m("benchmarks.fast_engine", "--port", str(port), "--chunks", "5"),
                     tmp_path_factory.mktemp("fast-engine") / "engine.log",
                     ready=http_ok(f"{url}/health"))
    with engine:
        yield url


def test_fast_engine_answers_chat_as_vllm_does(fast_engine: str) -> None:
    r = httpx.post(fast_engine + "/v1/chat/completions", content=wrk.chat_body(MODEL),
                   headers={"content-type": "application/json"})
    assert r.status_code == 200
    completion = ChatCompletion.model_validate(r.json())
    assert completion.model == MODEL and completion.usage is not None
    assert completion.choices[0].message.content


def test_fast_engine_streams_chunks_then_done(fast_engine: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "stream": True}
    with httpx.stream("POST", fast_engine + "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(json.loads(e)) for e in events[:-1]]
    assert len(chunks) == 5 and chunks[0].object == "chat.completion.chunk"


def test_stream_client_counts_events(fast_engine: str) -> None:
    port = int(fast_engine.rsplit(":", 1)[1])
    request = stream_client.build_request("127.0.0.1", port, stream_client.stream_body(MODEL))
    stats = stream_client.measure("127.0.0.1", port, request, connections=2, seconds=0.3,
                                  expect_events=5)
    assert stats.streams > 0 and stats.errors == 0
    assert stats.events >= stats.streams * 5  # the 5 chunk events ([DONE] not counted)
    # a stream that ends short of the expected events counts as an error
    short = stream_client.measure("127.0.0.1", port, request, connections=1, seconds=0.2,
                                  expect_events=6)
    assert short.errors > 0


def test_fast_engine_is_an_otlp_sink(fast_engine: str) -> None:
    before = httpx.get(fast_engine + "/_stats").json()["trace_exports"]
    r = httpx.post(fast_engine + "/v1/traces", content=b"\x0a\x00",
                   headers={"content-type": "application/x-protobuf"})
    assert r.status_code == 200 and r.content == b""
    assert httpx.get(fast_engine + "/_stats").json()["trace_exports"] == before + 1


def test_routeyard_tracing_row_exports_to_the_sink(fast_engine: str, tmp_path: Path) -> None:
    """The tracing row's environment makes a real router export OTLP spans to the engine."""
    env = build(ROUTEYARD_CMD, [], [], scaling_workers=0)[3].environment(fast_engine)
    config = write_routes(tmp_path / "config", int(fast_engine.rsplit(":", 1)[1]))
    before = httpx.get(fast_engine + "/_stats").json()["trace_exports"]
    with Router(config, env={**env, "OTEL_BSP_SCHEDULE_DELAY": "100"},
                log_dir=tmp_path) as router:
        r = router.client.post("/v1/chat/completions", content=wrk.chat_body(MODEL),
                               headers={"content-type": "application/json"})
        assert r.status_code == 200
        wait_until(lambda: httpx.get(fast_engine + "/_stats").json()["trace_exports"] > before,
                   10, "an OTLP export reaches the sink")


def test_unknown_path_is_vllms_404(fast_engine: str) -> None:
    r = httpx.post(fast_engine + "/v1/nothing", json={})
    assert r.status_code == 404 and r.json()["code"] == 404


WRK_OUTPUT = """\
Running 2s test @ http://127.0.0.1:8200/v1/chat/completions
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     4.01ms    2.10ms  31.94ms   90.00%
    Req/Sec    15.61k     1.01k   16.40k    85.00%
  Latency Distribution
     50%    3.92ms
     75%    4.10ms
     90%    4.50ms
     99%   31.94ms
  31216 requests in 2.00s, 16.28MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  15608.00
Transfer/sec:      8.14MB
"""


def test_wrk_report_is_read() -> None:
    result = wrk.parse(WRK_OUTPUT)
    assert result.rps == 15608.0 and result.requests == 31216
    assert result.p50_ms == pytest.approx(3.92) and result.p99_ms == pytest.approx(31.94)
    assert result.errors == 7
    micro = wrk.parse(WRK_OUTPUT.replace("3.92ms", "175.00us"))
    assert micro.p50_ms == pytest.approx(0.175)
    with pytest.raises(ValueError, match="--latency"):
        wrk.parse("Requests/sec: 1\n")


def test_default_rows_include_metrics_and_tracing() -> None:
    targets = build(ROUTEYARD_CMD, [], [], scaling_workers=2)
    names = [t.name for t in targets]
    assert names == ["direct", "routeyard", "routeyard[metrics off]", "routeyard[tracing on]",
                     "routeyard[load_aware]", "routeyard[cache_aware]", "routeyard --workers 2"]
    assert [t.policy for t in targets[4:6]] == ["load_aware", "cache_aware"]
    judged = [t.name for t in targets if t.judged and not t.is_direct]
    assert judged == ["routeyard"]
    tracing = targets[3].environment("http://127.0.0.1:9")
    assert tracing["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == "http://127.0.0.1:9/v1/traces"
    assert targets[2].environment("x") == {"ROUTEYARD_METRICS": "false"}
    bare = build(ROUTEYARD_CMD, [], [], scaling_workers=0, observability=False,
                 policies=False)
    assert [t.name for t in bare] == ["direct", "routeyard"]


def test_fast_engine_metrics_are_what_the_scored_policies_read(fast_engine: str,
                                                               tmp_path: Path) -> None:
    r = httpx.get(fast_engine + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert parse_engine_metrics(r.content) == EngineReading(0, 0, 0.0)
    assert len(r.content) > 10_000  # about a real engine's size: the scrape costs as much
    port = int(fast_engine.rsplit(":", 1)[1])
    for policy in SCORED_POLICIES:
        config = load_file(write_routes(tmp_path, port, policy))
        assert config.models[MODEL].policy == policy and config.models[MODEL].scrapes


def test_problems_name_errors_and_failed_runs() -> None:
    res = Results(["direct", "routeyard"])
    good = ChatSample(1000.0, 1.0, 2.0, 2000, 0, 10.0)
    res.chat[("routeyard", 1)] = [good, good]
    assert res.problems() == []
    res.chat[("routeyard", 64)] = [good, None]
    res.chat[("direct", 64)] = [ChatSample(1000.0, 1.0, 2.0, 2000, 3, 10.0)]
    res.failures["peer"] = "could not start: boom\nmore"
    assert sorted(res.problems()) == ["direct chat c=64: 3 errors", "peer: could not start: boom",
                                      "routeyard chat c=64: 1 run(s) failed"]
