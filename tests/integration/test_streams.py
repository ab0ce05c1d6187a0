"""Client disconnects abort the engine's work; many concurrent streams lose no byte."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import orjson

from tests.conftest import KINDS
from tests.harness import Router, wait_until

CHAT = KINDS["chat"]


def test_client_disconnect_aborts_upstream(router: Router, engines: dict, fake_only) -> None:
    request_id = f"abort-{uuid.uuid4().hex}"
    body = {"model": "chat-model", "messages": [{"role": "user", "content": "a"}],
            "stream": True, "max_tokens": 200}
    headers = {"x-request-id": request_id, "x-fake-token-delay-ms": "50",
               "x-fake-tokens": "200"}
    with httpx.stream("POST", f"{router.url}/v1/chat/completions", json=body,
                      headers=headers, timeout=30) as r:
        chunks = r.iter_raw()
        next(chunks)
        next(chunks)
    wait_until(lambda: request_id in httpx.get(engines["generate"] + "/_fake/aborted").json(),
               1.0, "the engine sees the abort")


def _sse_events(raw: bytes) -> list[bytes]:
    return [e for e in raw.split(b"\n\n") if e.strip()]


def _content(events: list[bytes]) -> str:
    text = []
    for event in events:
        data = event.removeprefix(b"data: ")
        if data != b"[DONE]":
            for choice in orjson.loads(data)["choices"]:
                text.append(choice["delta"].get("content") or "")
    return "".join(text)


async def _stream(client: httpx.AsyncClient, url: str, body: dict) -> bytes:
    async with client.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        return b"".join([chunk async for chunk in r.aiter_raw()])


def test_200_concurrent_streams_every_byte(router: Router, engines: dict) -> None:
    async def run() -> tuple[list[bytes], bytes]:
        limits = httpx.Limits(max_connections=250)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            bodies = [{"max_tokens": 20, "stream": True, "temperature": 0, "seed": i,
                       "messages": [{"role": "user", "content": f"stream {i}"}]}
                      for i in range(200)]
            routed = await asyncio.gather(*(
                _stream(client, f"{router.url}/v1/chat/completions",
                        {**b, "model": CHAT.name}) for b in bodies))
            direct = await asyncio.gather(*(
                _stream(client, f"{engines['generate']}/v1/chat/completions",
                        {**b, "model": CHAT.engine_model}) for b in bodies))
        return routed, direct

    routed, direct = asyncio.run(run())
    for via_router, via_engine in zip(routed, direct, strict=True):
        a, b = _sse_events(via_router), _sse_events(via_engine)
        assert len(a) == len(b)
        assert _content(a) == _content(b)
        assert a[-1] == b"data: [DONE]"
