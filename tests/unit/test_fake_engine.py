"""The fake engine, over real sockets: vLLM's formats, errors, knobs and introspection."""

from __future__ import annotations

import base64
import hashlib
import struct
import time
from collections.abc import Iterator

import httpx
import openai
import orjson
import pytest

from router.fake_engine import create_app
from tests.harness import Process, free_port, http_ok, python_m, running, wait_until

CHAT = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One engine per task, each run as ``python -m router.fake_engine`` (its own entry
    point, not the CLI's)."""
    logs = tmp_path_factory.mktemp("fake_engine")
    specs = {"generate": ["gen-a", "gen-b"], "embed": ["emb"], "score": ["rr"],
             "transcription": ["whisper"]}
    urls, processes = {}, []
    for task, models in specs.items():
        port = free_port()
        urls[task] = f"http://127.0.0.1:{port}"
        args = ["--task", task, "--port", str(port)]
        for model in models:
            args += ["--model", model]
        processes.append(Process(python_m("router.fake_engine", *args), logs / f"{task}.log",
                                 ready=http_ok(f"{urls[task]}/health")))
    with running(processes):
        yield urls


@pytest.fixture(scope="module")
def gen(engines: dict[str, str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=engines["generate"], timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def sdk(engines: dict[str, str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=engines["generate"] + "/v1", api_key="x", max_retries=0)


def _events(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\n\n")
    return raw[:-2].split(b"\n\n")


def _data(events: list[bytes]) -> list[dict]:
    return [orjson.loads(e.removeprefix(b"data: ")) for e in events if e != b"data: [DONE]"]


# app factory (no sockets) -------------------------------------------------------------


def test_create_app_names_are_unique_and_routes_follow_the_task() -> None:
    a, b = create_app(["m"], "embed"), create_app(["m"], "embed")
    assert a.name != b.name
    paths = {r.path.rstrip("/") or "/" for r in a.router.routes}
    assert {"v1/embeddings", "v2/embed", "v1/score", "v2/rerank", "tokenize"} <= paths
    assert "v1/chat/completions" not in paths and "classify" not in paths


def test_create_app_rejects_bad_task_and_models() -> None:
    with pytest.raises(ValueError, match="task='chat'"):
        create_app(["m"], "chat")
    with pytest.raises(ValueError, match="model"):
        create_app([], "generate")


# ops routes -----------------------------------------------------------------------------


def test_models_health_version(gen: httpx.Client) -> None:
    models = gen.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["gen-a", "gen-b"]
    card = models["data"][0]
    assert {k: card[k] for k in ("object", "owned_by", "root", "parent")} == {
        "object": "model", "owned_by": "vllm", "root": "gen-a", "parent": None}
    assert card["max_model_len"] > 0 and isinstance(card["permission"], list)
    health = gen.get("/health")
    assert health.status_code == 200 and health.content == b""
    assert "content-type" not in health.headers
    assert "version" in gen.get("/version").json()


def test_unregistered_path_is_404_and_wrong_method_405(engines: dict[str, str]) -> None:
    r = httpx.post(engines["generate"] + "/v1/embeddings", json={"input": "a"})
    assert (r.status_code, r.json()) == (404, {"detail": "Not Found"})
    r = httpx.post(engines["embed"] + "/v1/chat/completions", json={"messages": CHAT})
    assert (r.status_code, r.json()) == (404, {"detail": "Not Found"})
    r = httpx.get(engines["generate"] + "/v1/chat/completions")
    assert (r.status_code, r.json()) == (405, {"detail": "Method Not Allowed"})
    assert r.headers["allow"] == "POST"


# generate -------------------------------------------------------------------------------


def test_chat_non_stream_and_stream_agree(sdk: openai.OpenAI) -> None:
    full = sdk.chat.completions.create(model="gen-a", messages=CHAT)
    assert full.object == "chat.completion" and full.model == "gen-a"
    assert full.choices[0].finish_reason == "stop"
    assert full.usage is not None and full.usage.completion_tokens == 8
    assert full.usage.total_tokens == full.usage.prompt_tokens + 8
    chunks = list(sdk.chat.completions.create(
        model="gen-a", messages=CHAT, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage.model_copy(
        update={"prompt_tokens_details": None})


def test_chat_stream_framing_without_usage(gen: httpx.Client) -> None:
    r = gen.post("/v1/chat/completions", json={"messages": CHAT, "stream": True,
                                               "max_tokens": 3})
    assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
    events = _events(r.content)
    assert events[-1] == b"data: [DONE]"
    chunks = _data(events)
    assert len(chunks) == 4  # role + 3 tokens, no usage chunk
    assert chunks[0]["model"] == "gen-a"  # no model: the first served one
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "usage" not in chunks[-1]


def test_completions_with_sdk(sdk: openai.OpenAI) -> None:
    full = sdk.completions.create(model="gen-b", prompt="Hi", max_tokens=4)
    assert full.object == "text_completion" and full.choices[0].finish_reason == "length"
    assert full.usage is not None and full.usage.completion_tokens == 4
    parts = list(sdk.completions.create(model="gen-b", prompt="Hi", max_tokens=4, stream=True,
                                        stream_options={"include_usage": True}))
    assert "".join(p.choices[0].text for p in parts if p.choices) == full.choices[0].text
    assert parts[-1].usage is not None and parts[-1].usage.completion_tokens == 4


def test_responses_stream_events(gen: httpx.Client) -> None:
    r = gen.post("/v1/responses", json={"input": "Hello", "stream": True, "max_output_tokens": 2})
    events = _events(r.content)
    types = [e.split(b"\n", 1)[0].removeprefix(b"event: ").decode() for e in events]
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", "response.output_text.delta",
                     "response.output_text.delta", "response.output_text.done",
                     "response.content_part.done", "response.output_item.done",
                     "response.completed"]
    last = orjson.loads(events[-1].split(b"\ndata: ", 1)[1])
    assert last["sequence_number"] == 9 and last["response"]["object"] == "response"
    full = gen.post("/v1/responses", json={"input": "Hello", "max_output_tokens": 2}).json()
    assert full["output"][0]["content"][0]["text"] == last["response"]["output"][0][
        "content"][0]["text"]


def test_anthropic_messages(gen: httpx.Client) -> None:
    body = {"model": "gen-a", "max_tokens": 3, "messages": CHAT}
    full = gen.post("/v1/messages", json=body).json()
    assert full["type"] == "message" and full["stop_reason"] == "max_tokens"
    stream = _events(gen.post("/v1/messages", json={**body, "stream": True}).content)
    assert stream[0].startswith(b"event: message_start\n")
    assert stream[-1] == b'event: message_stop\ndata: {"type":"message_stop"}'
    missing = gen.post("/v1/messages", json={**body, "model": "nope"})
    assert missing.status_code == 404
    assert missing.json() == {"type": "error", "error": {
        "type": "NotFoundError", "message": "The model `nope` does not exist."}}
    count = gen.post("/v1/messages/count_tokens", json={"model": "gen-a", "messages": CHAT})
    assert count.json()["input_tokens"] > 0


def test_tokenize_roundtrip(gen: httpx.Client) -> None:
    tok = gen.post("/tokenize", json={"prompt": "héllo"}).json()
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] > 0
    assert gen.post("/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": "héllo"}


# errors ---------------------------------------------------------------------------------


def test_unknown_model_is_vllm_404(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        sdk.chat.completions.create(model="nope", messages=CHAT)
    assert info.value.body == {"message": "The model `nope` does not exist.",
                               "type": "NotFoundError", "param": "model", "code": 404}


@pytest.mark.parametrize(("content", "headers", "param"), [
    (b'{"model": "gen-a"}', {}, "body.messages"),
    (b"[1, 2]", {}, "body"),
    (b'{"messages": [', {}, "body.14"),
    (b'{"messages": []}', {"content-type": "text/plain"}, None),
    (b'{"messages": [], "stream_options": {"include_usage": true}}', {}, "stream_options"),
])
def test_validation_errors_are_400_bad_request(gen: httpx.Client, content: bytes,
                                               headers: dict, param: str | None) -> None:
    r = gen.post("/v1/chat/completions", content=content,
                 headers={"content-type": "application/json", **headers})
    assert r.status_code == 400
    error = r.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("Bad Request", 400, param)


# pooling --------------------------------------------------------------------------------


def test_embeddings_float_base64_and_bytes(engines: dict[str, str]) -> None:
    sdk = openai.OpenAI(base_url=engines["embed"] + "/v1", api_key="x", max_retries=0)
    floats = sdk.embeddings.create(model="emb", input=["a", "b"], encoding_format="float")
    decoded = sdk.embeddings.create(model="emb", input=["a", "b"])  # the SDK asks for base64
    assert [d.embedding for d in decoded.data] == [d.embedding for d in floats.data]
    assert len(floats.data[0].embedding) == 8 and floats.data[0].embedding != floats.data[1]
    raw = httpx.post(engines["embed"] + "/v1/embeddings",
                     json={"input": "a", "encoding_format": "base64"}).json()
    packed = base64.b64decode(raw["data"][0]["embedding"])
    assert list(struct.unpack("<8f", packed)) == floats.data[0].embedding
    r = httpx.post(engines["embed"] + "/v1/embeddings",
                   json={"input": "a", "encoding_format": "bytes"})
    assert r.headers["content-type"] == "application/octet-stream" and r.content == packed
    assert orjson.loads(r.headers["metadata"])["data"][0]["shape"] == [8]


def test_score_rerank_classify(engines: dict[str, str]) -> None:
    score = httpx.post(engines["embed"] + "/v1/score",
                       json={"text_1": "q", "text_2": ["a", "b"]}).json()
    assert [d["object"] for d in score["data"]] == ["score", "score"]
    rerank = httpx.post(engines["score"] + "/v2/rerank",
                        json={"query": "q", "documents": ["a", {"text": "b"}, "c"], "top_n": 2})
    results = rerank.json()["results"]
    assert len(results) == 2 and results[0]["relevance_score"] >= results[1]["relevance_score"]
    classify = httpx.post(engines["score"] + "/classify", json={"input": ["x"]}).json()
    assert classify["data"][0]["num_classes"] == 2
    assert httpx.post(engines["score"] + "/v1/embeddings", json={"input": "a"}).status_code == 404


# transcription --------------------------------------------------------------------------


def test_transcription_with_sdk_and_stream(engines: dict[str, str]) -> None:
    url = engines["transcription"]
    sdk = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    audio = ("a.wav", b"RIFF" + b"\0" * 64_000, "audio/wav")
    result = sdk.audio.transcriptions.create(model="whisper", file=audio)
    assert result.text and result.usage is not None
    translated = httpx.post(url + "/v1/audio/translations", files={"file": audio}).json()
    assert translated == {"text": result.text}  # translations report no usage
    r = httpx.post(url + "/v1/audio/transcriptions", files={"file": audio},
                   data={"stream": "true", "stream_include_usage": "true"})
    events = _events(r.content)
    assert events[-1] == b"data: [DONE]"
    chunks = _data(events)
    assert {c["object"] for c in chunks} == {"transcription.chunk"}
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks[:-1]) == result.text
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8
    seen = httpx.get(url + "/_fake/requests").json()[-1]
    assert seen["form"]["stream"] == "true" and seen["file_size"] == len(audio[1])


# knobs and introspection ----------------------------------------------------------------


def test_knobs_latency_tokens_status(gen: httpx.Client) -> None:
    start = time.monotonic()
    r = gen.post("/v1/chat/completions", json={"messages": CHAT},
                 headers={"x-fake-latency-ms": "200", "x-fake-tokens": "3"})
    assert time.monotonic() - start >= 0.2
    assert r.json()["usage"]["completion_tokens"] == 3
    r = gen.post("/v1/chat/completions", json={},
                 headers={"x-fake-status": "503", "x-fake-body": '{"object":"error"}'})
    assert (r.status_code, r.text) == (503, '{"object":"error"}')
    assert r.headers["content-type"] == "application/json"
    r = gen.post("/v1/chat/completions", headers={"x-fake-tokens": "many"})
    assert r.status_code == 400


def test_token_delay_paces_the_stream(gen: httpx.Client) -> None:
    arrivals = []
    headers = {"x-fake-token-delay-ms": "60", "x-fake-tokens": "3"}
    start = time.monotonic()
    with gen.stream("POST", "/v1/chat/completions", headers=headers,
                    json={"messages": CHAT, "stream": True}) as r:
        for _ in r.iter_raw():
            arrivals.append(time.monotonic() - start)
    assert arrivals[-1] >= 0.18  # three tokens, 60 ms apart
    assert arrivals[-1] - arrivals[0] >= 0.15  # the role chunk went out before any delay


def test_mid_stream_error_and_drop(sdk: openai.OpenAI, gen: httpx.Client) -> None:
    stream = sdk.chat.completions.create(model="gen-a", messages=CHAT, stream=True,
                                         extra_headers={"x-fake-error-after": "2"})
    with pytest.raises(openai.APIError, match="Internal server error"):
        list(stream)
    with pytest.raises(httpx.RemoteProtocolError):
        gen.post("/v1/chat/completions", json={"messages": CHAT, "stream": True},
                 headers={"x-fake-drop-after": "2"})


def test_client_disconnect_is_logged_as_aborted(gen: httpx.Client) -> None:
    gen.post("/_fake/reset")
    headers = {"x-request-id": "abort-me", "x-fake-token-delay-ms": "50",
               "x-fake-tokens": "100"}
    with gen.stream("POST", "/v1/chat/completions", headers=headers,
                    json={"messages": CHAT, "stream": True}) as r:
        chunks = r.iter_raw()
        next(chunks)
        next(chunks)
    with pytest.raises(httpx.ReadTimeout):
        gen.post("/v1/chat/completions", json={}, timeout=0.3,
                 headers={"x-request-id": "hang-me", "x-fake-hang": "1"})
    wait_until(lambda: set(gen.get("/_fake/aborted").json()) == {"abort-me", "hang-me"}, 1,
               "both requests are logged as aborted")


def test_request_log_and_reset(gen: httpx.Client) -> None:
    gen.post("/_fake/reset")
    body = b'{"model": "gen-b", "messages": [{"role": "user", "content": "x"}]}'
    gen.post("/v1/chat/completions?a=1", content=body,
             headers={"Content-Type": "application/json", "X-Request-Id": "rid-1"})
    gen.get("/no/such/path")
    log = gen.get("/_fake/requests").json()
    assert [e["path"] for e in log] == ["/v1/chat/completions", "/no/such/path"]
    entry = log[0]
    assert entry["request_id"] == "rid-1" and entry["headers"]["x-request-id"] == "rid-1"
    assert entry["json"] == orjson.loads(body) and entry["query"] == "a=1"
    assert entry["body_len"] == len(body)
    assert entry["body_sha256"] == hashlib.sha256(body).hexdigest()
    only = gen.get("/_fake/requests", params={"path": "/no/such/path"}).json()
    assert len(only) == 1
    gen.post("/_fake/reset")
    assert gen.get("/_fake/requests").json() == []


def test_injected_fault_is_sticky_for_count_requests(gen: httpx.Client) -> None:
    assert gen.post("/_fake/inject", json={"status": 503, "count": 2,
                                           "paths": ["/health"]}).status_code == 200
    assert gen.get("/v1/models").status_code == 200  # other paths untouched
    assert [gen.get("/health").status_code for _ in range(3)] == [503, 503, 200]
    assert gen.post("/_fake/inject", json={"bogus": 1}).status_code == 400
    gen.post("/_fake/reset")


def test_lora_adapters_are_listed_with_their_parent_served_and_loaded_at_runtime(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    engine = Process(python_m("router.fake_engine", "--task", "generate", "--port", str(port),
                              "--model", "base", "--model", "alias", "--lora", "sql"),
                     tmp_path_factory.mktemp("lora") / "engine.log",
                     ready=http_ok(f"{url}/health"))
    with running([engine]), httpx.Client(base_url=url, timeout=10) as client:
        def listed() -> list[tuple[str, str, str | None]]:
            return [(c["id"], c["root"], c["parent"])
                    for c in client.get("/v1/models").json()["data"]]

        assert listed() == [("base", "base", None), ("alias", "alias", None),
                            ("sql", "/fake/loras/sql", "base")]
        chat = {"model": "sql", "messages": CHAT}
        answer = client.post("/v1/chat/completions", json=chat)
        assert answer.status_code == 200 and answer.json()["model"] == "sql"
        loaded = client.post("/_fake/load_lora", json={"lora_name": "poem",
                                                       "lora_path": "/tmp/poem"})
        assert loaded.status_code == 200
        assert listed()[-1] == ("poem", "/tmp/poem", "base")
        assert client.post("/_fake/unload_lora", json={"lora_name": "sql"}).status_code == 200
        assert [i for i, _, _ in listed()] == ["base", "alias", "poem"]
        gone = client.post("/v1/chat/completions", json=chat)
        assert gone.status_code == 404 and gone.json()["error"]["type"] == "NotFoundError"
        assert client.post("/_fake/unload_lora", json={"lora_name": "sql"}).status_code == 404
        assert client.post("/_fake/load_lora", json={"name": "x"}).status_code == 400
        assert client.post("/_fake/load_lora", json={"lora_name": "base"}).status_code == 400
