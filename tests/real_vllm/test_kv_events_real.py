"""The precise prefix index learns from a real vLLM engine's KV events (CPU build).

One engine of the tiny chat model publishes KV events over ZMQ; a ``KVEventSubscriber``
feeds a ``PrefixIndex``. A served prompt's blocks, cut from the token ids the engine's
``/tokenize`` gives, are then found in the index under that engine; with a small KV cache,
other prompts evict them and the engine's ``BlockRemoved`` events take them out again.

Run: ``bash scripts/real_vllm/install.sh && pytest -m real_vllm tests/real_vllm -s``.
Outside CI a missing vLLM venv skips; in CI (``CI=true``) it fails the tier.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from router.engine_tokens import engine_token_ids
from router.kv_events import EngineBlocks, KVEventSubscriber
from router.prefix_index import PrefixIndex, token_blocks
from router.upstream import Origin, Pool, Transport
from tests.harness import eventually
from tests.real_vllm.serve_script import serve

pytestmark = pytest.mark.real_vllm

MODEL = "tiny-qwen2"
#: vLLM's CPU block size (``vllm:cache_config_info``), which the events carry.
BLOCK = 128
#: A small KV cache, so a few prompts evict the first: 6 MiB is 48 blocks of this model.
KV_CACHE_BYTES = 6 * 1024 * 1024
KV_CACHE_BLOCKS = 48


@dataclass(frozen=True, slots=True)
class EventEngine:
    url: str
    events: str  # the ZMQ address of its KV event publisher


@pytest.fixture(scope="module")
def event_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EventEngine]:
    vllm = serve.venv() / "bin" / "vllm"
    if not vllm.exists():
        message = f"no vLLM at {vllm}: run `bash scripts/real_vllm/install.sh` first"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    models = serve.build_models()
    port = serve.free_port()
    chat = serve.SPECS["chat"]
    # vLLM binds only an endpoint with "*" (or "::"); with a host name it connects
    config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{port}"}
    spec = serve.Spec("chat", chat.names, (*chat.flags, "--kv-events-config", json.dumps(config)),
                      kv_cache_bytes=KV_CACHE_BYTES)
    engine = serve.launch(spec, models["chat"], Path(tmp_path_factory.mktemp("vllm-kv-events")))
    engines = {"chat": engine}
    try:
        deadline = time.monotonic() + 600
        while not serve.healthy(engine.url):
            if engine.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve with KV events not healthy:\n"
                                   f"{serve.tail(engine.log)}")
            time.sleep(0.5)
        yield EventEngine(engine.url, f"tcp://127.0.0.1:{port}")
    finally:
        serve.stop(engines)


def _prompt(topic: str) -> str:
    """A few whole blocks of tokens that no other prompt of the test starts with."""
    return f"{topic}: " + " ".join(f"{topic} fact {i} is worth remembering." for i in range(20))


async def _serve(client: httpx.AsyncClient, backend: Backend, prompt: str) -> list[int]:
    """Send ``prompt`` through the engine; return its token ids as the engine's ``/tokenize``
    gives them to the router (``engine_token_ids``)."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1}
    answer = await client.post("/v1/completions", json=body)
    assert answer.status_code == 200, answer.text
    ids = await engine_token_ids(backend, MODEL, body, timeout=30)
    assert ids is not None and len(ids) >= 3 * BLOCK
    return ids


@dataclass
class Backend:
    """The engine as ``engine_token_ids`` sees an endpoint."""

    origin: Origin
    transport: Transport
    api_key_header: str | None = None


async def test_the_index_learns_and_forgets_a_real_engines_blocks(
    event_engine: EventEngine,
) -> None:
    index = PrefixIndex(max_blocks=10_000)
    blocks = EngineBlocks(event_engine.url, lambda lora: index if lora is None else None,
                          max_blocks=10_000)
    subscriber = KVEventSubscriber(event_engine.events, blocks)
    subscriber.start()
    origin = Origin.from_url(event_engine.url)
    backend = Backend(origin, Pool(origin))
    async with httpx.AsyncClient(base_url=event_engine.url, timeout=60) as client:
        try:
            # a SUB socket misses what is published before it has joined: warm up until
            # events arrive (those lost before show as a sequence gap, and are cleared)
            async def joined() -> bool:
                await _serve(client, backend, _prompt(f"warm-up {time.monotonic_ns()}"))
                deadline = time.monotonic() + 2
                while not blocks.batches and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                return blocks.batches > 0

            await eventually(joined, 120, "KV events from the engine")
            assert blocks.block_size == BLOCK

            ids = await _serve(client, backend, _prompt("the served prompt"))
            hashes = token_blocks(ids, BLOCK)
            await eventually(lambda: index.match(hashes) == {event_engine.url: len(ids) // BLOCK},
                             30, "the served prompt's blocks in the index")
            print(f"\nkv events: the served prompt's {len(hashes)} blocks learned after "
                  f"{blocks.batches} batches ({len(index)} blocks held, {blocks.resyncs} resyncs)")

            # other prompts fill the 48-block cache: the engine evicts the first prompt's
            # blocks and its BlockRemoved events take them out of the index
            async def evicted() -> bool:
                await _serve(client, backend, _prompt(f"filler {time.monotonic_ns()}"))
                return index.match(hashes).get(event_engine.url, 0) < len(hashes)

            await eventually(evicted, 180, "the first prompt's blocks evicted")
            assert index.held_by(event_engine.url) <= KV_CACHE_BLOCKS
            print(f"kv events: evicted after {blocks.batches} batches; "
                  f"{index.held_by(event_engine.url)} blocks held")
        finally:
            await subscriber.close()
            backend.transport.close()


async def test_the_engines_tokens_of_a_chat_are_the_ones_it_serves(
    event_engine: EventEngine,
) -> None:
    origin = Origin.from_url(event_engine.url)
    backend = Backend(origin, Pool(origin))
    body = {"model": MODEL, "max_tokens": 1, "return_token_ids": True,
            "messages": [{"role": "system", "content": _prompt("support desk")},
                         {"role": "user", "content": "Where is my parcel?"}]}
    try:
        ids = await engine_token_ids(backend, MODEL, body, timeout=30)
    finally:
        backend.transport.close()
    async with httpx.AsyncClient(base_url=event_engine.url, timeout=60) as client:
        answer = await client.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    assert ids is not None and ids == answer.json()["prompt_token_ids"]
