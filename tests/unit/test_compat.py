"""``routeyard compat``: passes through the real router, fails through a broken proxy."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from router.catalog import PROXIED, StreamFormat
from router.cli import main
from router.compat import TASKS, run
from router.compat.compare import (
    IGNORED,
    IGNORED_FIELDS,
    MODEL,
    Event,
    check_format,
    diff,
    normalise,
    parse_sse,
)
from router.compat.report import read_facts
from router.compat.requests import groups_of, suite
from tests.conftest import KINDS
from tests.harness import ROOT, Router, start_router

Mutation = Callable[[int, str, bytes], tuple[int, bytes]]


def engine_model(task: str) -> str:
    return next(k.engine_model for k in KINDS.values() if k.task == task)


@pytest.fixture(scope="module")
def compat_router(engines: dict[str, str], tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[Router]:
    """A router with one public model per task, every group of its suite enabled, served
    by the engine under another name (so the model rewrite is part of what is compared)."""
    lines = ["models:"]
    for task in TASKS:
        lines += [f"  compat-{task}:", "    backends:", f"      - url: {engines[task]}",
                  f"    endpoints: [{', '.join(sorted(groups_of(task)))}]",
                  f"    backend_model: {engine_model(task)}"]
    with start_router(tmp_path_factory.mktemp("compat"), "\n".join(lines) + "\n") as router:
        yield router


@pytest.mark.parametrize("task", TASKS)
def test_compat_finds_no_difference_through_the_router(
    task: str, engines: dict[str, str], compat_router: Router, tmp_path: Path
) -> None:
    out = io.StringIO()
    report = tmp_path / "report.md"
    code = run(engines[task], compat_router.url, f"compat-{task}", task,
               engine_model=engine_model(task), markdown=report, out=out)
    assert code == 0, out.getvalue()
    assert "no differences" in out.getvalue()
    facts = read_facts(report.read_text())
    assert facts is not None and facts["task"] == task
    assert facts["paths"] and all(facts["paths"].values())


def test_compat_command_line(engines: dict[str, str], compat_router: Router,
                             capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["compat", "--engine", engines["score"], "--router", compat_router.url,
                 "--model", "compat-score", "--engine-model", engine_model("score"),
                 "--task", "score", "--groups", "rerank"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "/v2/rerank" in printed and "/classify" not in printed


def test_compat_command_rejects_unknown_group(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["compat", "--engine", "http://127.0.0.1:9", "--router", "http://127.0.0.1:9",
                 "--model", "m", "--task", "embed", "--groups", "rerank"])
    assert code == 2
    assert "rerank" in capsys.readouterr().err


def test_ignored_fields_are_documented() -> None:
    doc = (ROOT / "docs" / "supported-apis.md").read_text(encoding="utf-8")
    listed = ", ".join(f"`{name}`" for name in sorted(IGNORED_FIELDS))
    assert listed in " ".join(doc.split()), "update the ignored fields in supported-apis.md"


def test_suite_reads_aliases_from_the_catalog() -> None:
    sent = {p.path for p in suite("score")}
    for route in PROXIED:
        if route.group in ("rerank", "score", "classify"):
            assert set(route.paths) <= sent


# --- a deliberately broken pass-through proxy ----------------------------------------


class BrokenProxy:
    """An HTTP/1.1 pass-through proxy on 127.0.0.1 that damages every answer with ``mutate``.

    It reads each request whole, forwards it with httpx, and writes the (mutated) answer
    back with a content length: enough for compat's one-request-at-a-time client.
    """

    def __init__(self, upstream: str, mutate: Mutation) -> None:
        self.upstream = upstream
        self.mutate = mutate
        self.url = ""
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> BrokenProxy:
        self._thread.start()
        assert self._ready.wait(5), "proxy did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with httpx.AsyncClient(base_url=self.upstream, timeout=30) as client:
            self._client = client
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
            self._ready.set()
            async with server:
                await self._stop.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                method, target, _ = head[0].split(" ", 2)
                headers = dict(line.split(": ", 1) for line in head[1:] if line)
                headers = {k.lower(): v for k, v in headers.items()}
                body = await reader.readexactly(int(headers.pop("content-length", "0")))
                for name in ("host", "connection"):
                    headers.pop(name, None)
                answer = await self._client.request(method, target, headers=headers,
                                                    content=body)
                content_type = answer.headers.get("content-type", "")
                status, data = self.mutate(answer.status_code, content_type, answer.content)
                writer.write(f"HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\n"
                             f"content-length: {len(data)}\r\n\r\n".encode() + data)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def _events(body: bytes) -> list[bytes]:
    return [e for e in body.split(b"\n\n") if e]


def _join(events: list[bytes]) -> bytes:
    return b"".join(e + b"\n\n" for e in events)


def drop_usage_chunk(status: int, content_type: str, body: bytes) -> tuple[int, bytes]:
    if content_type.startswith("text/event-stream"):
        body = _join([e for e in _events(body) if b'"choices":[]' not in e])
    return status, body


def swap_first_events(status: int, content_type: str, body: bytes) -> tuple[int, bytes]:
    if content_type.startswith("text/event-stream"):
        events = _events(body)
        events[1:3] = events[2:0:-1]
        body = _join(events)
    return status, body


def drop_done(status: int, content_type: str, body: bytes) -> tuple[int, bytes]:
    return status, body.replace(b"data: [DONE]\n\n", b"")


def not_found_as_bad_request(status: int, content_type: str, body: bytes) -> tuple[int, bytes]:
    return (400 if status == 404 else status), body


@pytest.mark.parametrize(("mutate", "probe", "named"), [
    (drop_usage_chunk, "chat-stream-usage", '"usage":{"prompt_tokens"'),
    (swap_first_events, "responses-stream", "event 2:"),
    (drop_done, "completions-stream", "router stream does not end with exactly one"),
    (not_found_as_bad_request, "error-unknown-model", "status: engine 404, router 400"),
])
def test_compat_fails_through_a_broken_proxy(
    mutate: Mutation, probe: str, named: str, engines: dict[str, str]
) -> None:
    model = engine_model("generate")
    out = io.StringIO()
    with BrokenProxy(engines["generate"], mutate) as proxy:
        code = run(engines["generate"], proxy.url, model, "generate", out=out)
    text = out.getvalue()
    assert code == 1, text
    failing = text.split("\n\n", 2)[-1]
    assert f"{probe} (POST " in failing and named in failing, text


# --- normalisation and framing ---------------------------------------------------------


def test_parse_sse_reads_named_events_comments_and_crlf() -> None:
    body = b": ping\r\n\r\nevent: a\r\ndata: {\"x\":1}\r\n\r\ndata: [DONE]\r\n\r\n"
    assert parse_sse(body) == [Event("a", '{"x":1}'), Event(None, "[DONE]")]


def test_normalise_masks_per_request_fields_and_model_names() -> None:
    models = frozenset({"public", "served"})
    value = {"id": "cmpl-1", "created": 5, "model": "served",
             "choices": [{"tool_calls": [{"id": "call-9", "name": "f"}]}],
             "error": {"message": "The model `public` does not exist."}}
    assert normalise(value, models) == {
        "id": IGNORED, "created": IGNORED, "model": MODEL,
        "choices": [{"tool_calls": [{"id": IGNORED, "name": "f"}]}],
        "error": {"message": f"The model `{MODEL}` does not exist."},
    }


def test_check_format_follows_the_catalog() -> None:
    data_done = [Event(None, "{}"), Event(None, "[DONE]")]
    named = [Event("response.created", "{}"), Event("response.completed", "{}")]
    assert check_format(data_done, StreamFormat.DATA_DONE) == []
    assert check_format(named, StreamFormat.EVENT_DATA) == []
    assert check_format(data_done[:1], StreamFormat.DATA_DONE)
    assert check_format([*named, Event(None, "[DONE]")], StreamFormat.EVENT_DATA)


def test_floats_are_equal_within_float32_rounding_and_no_further() -> None:
    engine = {"results": [{"index": 0, "relevance_score": 0.4950129985809326}]}
    rounded = {"results": [{"index": 0, "relevance_score": 0.49501293897628784}]}
    changed = {"results": [{"index": 0, "relevance_score": 0.4951}]}
    assert list(diff(engine, rounded)) == []
    assert list(diff(engine, changed)) == [
        "body.results[0].relevance_score: engine 0.4950129985809326, router 0.4951"]
    assert list(diff({"n": 1}, {"n": 1.0})) != []  # an int is not a float
