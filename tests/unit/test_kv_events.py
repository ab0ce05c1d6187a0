"""router/kv_events.py: vLLM's KV event batches decoded, applied to the index, and received
over a loopback ZMQ socket.

The payloads are built here the way vLLM 0.32 encodes them (msgspec ``array_like`` batch,
events as maps tagged by ``type``, as captured from the CPU build; see docs/routing.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import zmq
import zmq.asyncio

from router.kv_events import (
    Batch,
    Cleared,
    EngineBlocks,
    EventError,
    KVEventSubscriber,
    Removed,
    Stored,
    decode,
)
from router.prefix_index import PrefixIndex, token_blocks
from tests.harness import eventually
from tests.unit.test_imports import loaded_after

BLOCK = 4


def stored(hashes: list[int | bytes], parent: int | bytes | None, tokens: list[int], *,
           lora_name: str | None = None, extra_keys: list[Any] | None = None) -> dict[str, Any]:
    """A ``BlockStored`` as vLLM 0.32 sends it (fields in its order, defaults it fills)."""
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent,
            "token_ids": tokens, "block_size": BLOCK, "lora_id": None, "medium": "GPU",
            "lora_name": lora_name,
            "extra_keys": extra_keys if extra_keys is not None else [None] * len(hashes),
            "group_idx": 0, "kv_cache_spec_kind": "full_attention"}


def removed(hashes: list[int | bytes]) -> dict[str, Any]:
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": "GPU", "group_idx": 0}


CLEARED = {"type": "AllBlocksCleared"}


def payload(*events: dict[str, Any] | list[Any]) -> bytes:
    return msgspec.msgpack.encode([1796409646.25, list(events), 0])


PROMPT = list(range(500, 512))  # three blocks of 4


Indexes = dict[str | None, PrefixIndex]


def engine(max_blocks: int = 100) -> tuple[EngineBlocks, PrefixIndex, Indexes]:
    indexes = {None: PrefixIndex(max_blocks), "sql-lora": PrefixIndex(max_blocks)}
    blocks = EngineBlocks("http://a:8000", indexes.get, max_blocks)
    return blocks, indexes[None], indexes


def test_importing_the_module_loads_neither_zmq_nor_msgspec() -> None:
    loaded = loaded_after("import router.kv_events, router.prefix_index")
    assert loaded.isdisjoint({"zmq", "msgspec"}), sorted(loaded & {"zmq", "msgspec"})


# -- decoding -----------------------------------------------------------------------------
def test_decode_reads_vllm_032_batches() -> None:
    batch = decode(payload(stored([11, 12], None, PROMPT[:8]), removed([12]), CLEARED))
    assert batch == Batch(1796409646.25, (
        Stored((11, 12), None, (*PROMPT[:8],), BLOCK, None, (None, None)),
        Removed((12,)), Cleared()), 0)


def test_decode_reads_sha256_hashes_and_the_older_array_encoding() -> None:
    digest = bytes(range(32))
    legacy = ["BlockStored", [digest], None, PROMPT[:4], BLOCK, None, "GPU"]
    batch = decode(payload(legacy, ["BlockRemoved", [digest], "GPU"], ["AllBlocksCleared"]))
    assert batch.events == (Stored((digest,), None, (*PROMPT[:4],), BLOCK), Removed((digest,)),
                            Cleared())


def test_decode_skips_event_kinds_it_does_not_know_and_other_cache_groups() -> None:
    other_group = {**stored([2], None, PROMPT[:4]), "group_idx": 1}
    batch = decode(payload({"type": "SomethingNew", "x": 1}, other_group, removed([1]),
                           {**removed([2]), "group_idx": 1}))
    assert batch.events == (Removed((1,)),)


@pytest.mark.parametrize("bad", [
    b"\xc1",  # never used in msgpack
    msgspec.msgpack.encode({"ts": 1}),
    msgspec.msgpack.encode([1.0, [{"type": "BlockStored"}], 0]),  # no fields
    msgspec.msgpack.encode([1.0, [{"type": "BlockStored", "block_hashes": [1], "token_ids": [1],
                          "block_size": 0}], 0]),
    msgspec.msgpack.encode([1.0, [42], 0]),
])
def test_decode_refuses_what_is_not_a_batch(bad: bytes) -> None:
    with pytest.raises(EventError):
        decode(bad)


# -- applying events ------------------------------------------------------------------------
def test_stored_blocks_are_matched_by_the_token_ids_of_a_request() -> None:
    blocks, index, _ = engine()
    # the engine stored the prompt in two events: the second chains on the first's block
    blocks.message(0, payload(stored([11], None, PROMPT[:4])))
    blocks.message(1, payload(stored([12, 13], 11, PROMPT[4:])))
    request = token_blocks([*PROMPT, 1, 2], blocks.block_size or 0)  # a partial tail block
    assert blocks.block_size == BLOCK
    assert index.match(request) == {"http://a:8000": 3}
    assert index.match(token_blocks([*PROMPT[:4], 0, 0, 0, 0], BLOCK)) == {"http://a:8000": 1}


def test_removed_and_cleared_events_take_blocks_out() -> None:
    blocks, index, _ = engine()
    blocks.message(0, payload(stored([11, 12, 13], None, PROMPT)))
    blocks.message(1, payload(removed([13, 999])))  # 999: never stored, ignored
    assert index.match(token_blocks(PROMPT, BLOCK)) == {"http://a:8000": 2}
    blocks.message(2, payload(CLEARED))
    assert len(index) == 0


def test_a_block_with_an_unknown_parent_is_skipped() -> None:
    blocks, index, _ = engine()
    blocks.message(0, payload(stored([12], 11, PROMPT[4:8])))
    assert len(index) == 0 and blocks.orphans == 1


def test_a_sequence_gap_clears_the_endpoint_and_rebuilds_from_what_follows() -> None:
    blocks, index, _ = engine()
    index.stored("http://b:8000", token_blocks(PROMPT, BLOCK))  # another engine's blocks
    blocks.message(0, payload(stored([11, 12, 13], None, PROMPT)))
    blocks.message(2, payload(stored([21], None, PROMPT[:4])))  # 1 was lost
    assert blocks.resyncs == 1
    assert index.match(token_blocks(PROMPT, BLOCK)) == {"http://a:8000": 1, "http://b:8000": 3}
    blocks.message(0, payload(CLEARED))  # a publisher restart counts from 0 again
    assert blocks.resyncs == 2
    blocks.message(1, payload(stored([31], None, PROMPT[:4])))
    assert blocks.resyncs == 2


def test_a_payload_that_does_not_decode_clears_the_endpoint() -> None:
    blocks, index, _ = engine()
    blocks.message(0, payload(stored([11], None, PROMPT[:4])))
    blocks.message(1, b"\xc1")
    assert len(index) == 0 and blocks.resyncs == 1
    blocks.message(2, payload(stored([11], None, PROMPT[:4])))
    assert len(index) == 1 and blocks.resyncs == 1


def test_an_event_that_cannot_be_applied_clears_the_endpoint() -> None:
    blocks, index, indexes = engine()
    blocks.message(0, payload(stored([11], None, PROMPT[:4])))
    blocks.message(1, payload(stored([12], [1, 2], PROMPT[4:8])))  # a parent hash that is a list
    blocks.message(2, payload(stored([13], None, PROMPT[:4], lora_name="sql-lora",
                                     extra_keys=[7])))  # an adapter's keys that are no list
    assert blocks.resyncs == 2
    assert len(index) == 0 and len(indexes["sql-lora"]) == 0


def test_adapter_blocks_go_to_the_adapters_index_and_extra_keys_do_not_match() -> None:
    blocks, index, indexes = engine()
    blocks.message(0, payload(stored([41], None, PROMPT[:4], lora_name="sql-lora",
                                     extra_keys=[["sql-lora"]])))
    blocks.message(1, payload(stored([42], None, PROMPT[:4], lora_name="other",
                                     extra_keys=[["other"]])))  # no index: ignored
    blocks.message(2, payload(stored([51], None, PROMPT[:4], extra_keys=[["salt-1"]])))
    assert len(index) == 1 and index.match(token_blocks(PROMPT, BLOCK)) == {}
    assert indexes["sql-lora"].match(token_blocks(PROMPT, BLOCK)) == {"http://a:8000": 1}
    blocks.message(3, payload(CLEARED))
    assert len(indexes["sql-lora"]) == 0 and len(index) == 0


def test_the_engine_hash_map_is_bounded() -> None:
    blocks, index, _ = engine(max_blocks=2)
    blocks.message(0, payload(stored([11, 12, 13], None, PROMPT)))
    assert index.held_by("http://a:8000") == 2  # the index's own bound: the tail went
    # the map forgot the same block, so what the index holds can still be removed
    blocks.message(1, payload(removed([13, 12])))
    assert index.match(token_blocks(PROMPT, BLOCK)) == {"http://a:8000": 1}
    blocks.message(2, payload(removed([11])))
    assert index.held_by("http://a:8000") == 0


# -- over ZMQ -------------------------------------------------------------------------------
@pytest.fixture
async def publisher() -> AsyncIterator[tuple[zmq.asyncio.Socket, str]]:
    """An XPUB bound on loopback (it sees each subscription, so nothing is sent before the
    subscriber is there), as vLLM's publisher binds ``tcp://*:port``."""
    context = zmq.asyncio.Context()
    socket = context.socket(zmq.XPUB)
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    yield socket, f"tcp://127.0.0.1:{port}"
    socket.close(linger=0)
    context.term()


async def test_a_subscriber_fills_the_index_from_a_publisher_and_clears_on_a_gap(
    publisher: tuple[zmq.asyncio.Socket, str],
) -> None:
    pub, address = publisher
    blocks, index, _ = engine()
    subscriber = KVEventSubscriber(address, blocks)
    subscriber.start()
    try:
        assert (await asyncio.wait_for(pub.recv(), 5))[:1] == b"\x01"  # subscribed
        await pub.send_multipart([b"", (0).to_bytes(8, "big"),
                                  payload(stored([11, 12, 13], None, PROMPT))])
        await eventually(lambda: index.match(token_blocks(PROMPT, BLOCK)) == {"http://a:8000": 3},
                         5, "the stored blocks in the index")
        await pub.send_multipart([b"", (5).to_bytes(8, "big"), payload(removed([999]))])
        await eventually(lambda: blocks.resyncs == 1, 5, "a resync after the gap")
        assert len(index) == 0
        await pub.send_multipart([b"", b"short"])  # not vLLM's framing: lost events too
        await eventually(lambda: blocks.resyncs == 2, 5, "a resync after a bad message")
    finally:
        await subscriber.close()
