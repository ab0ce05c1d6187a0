"""SIGTERM: the router stops accepting, and every stream in flight still completes."""

from __future__ import annotations

import asyncio
import json
import signal
import socket

import httpx

from tests.fleet.conftest import CHAT, Fleet, chat_body, model, routes
from tests.harness import wait_until


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except ConnectionRefusedError:
        return True
    return False


def _refused_within(port: int, timeout: float) -> bool:
    try:
        wait_until(lambda: _refused(port), timeout, "refused")
    except AssertionError:
        return False
    return True


def _tokens(raw: bytes) -> list[str]:
    events = [e.removeprefix(b"data: ") for e in raw.split(b"\n\n") if e.strip()]
    assert events[-1] == b"[DONE]", raw[-200:]
    return [choice["delta"].get("content") or ""
            for event in events[:-1] for choice in json.loads(event)["choices"]
            if choice["delta"].get("content")]


async def test_sigterm_lets_streams_finish_and_refuses_new_connections(
        launch_router, fleet: Fleet) -> None:
    router = launch_router(routes({"fleet": model(*fleet)}))
    port = router.port
    n = 10
    started = [asyncio.Event() for _ in range(n)]
    # 15 tokens, 200 ms apart: each stream lasts about three seconds.
    headers = {"x-fake-token-delay-ms": "200", "x-fake-tokens": "15"}

    async def stream(i: int, client: httpx.AsyncClient) -> bytes:
        body = chat_body("fleet", f"stream {i}", stream=True, max_tokens=15)
        async with client.stream("POST", f"{router.url}{CHAT}", json=body,
                                 headers=headers) as r:
            assert r.status_code == 200
            chunks = []
            async for chunk in r.aiter_raw():
                chunks.append(chunk)
                started[i].set()
        return b"".join(chunks)

    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        streams = [asyncio.create_task(stream(i, client)) for i in range(n)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 10)

        router.signal(signal.SIGTERM)
        refused = await asyncio.to_thread(_refused_within, port, 1.0)
        in_flight = sum(not s.done() for s in streams)
        bodies = await asyncio.gather(*streams)

    for raw in bodies:  # every stream ran to its end
        assert len(_tokens(raw)) == 15
    assert await asyncio.to_thread(router.wait, 10) == 0
    assert in_flight == n  # the refusal check below ran while all ten were still streaming
    assert refused, ("after SIGTERM the router still completes TCP handshakes on its port "
                     "(connections queue unserved) instead of refusing new connections")
