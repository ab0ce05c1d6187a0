"""vLLM's KV cache events → a ``PrefixIndex``: the precise mode of prefix-cache affinity.

An engine started with ``--kv-events-config '{"enable_kv_cache_events":true,
"publisher":"zmq","endpoint":"tcp://*:5557"}'`` publishes on a ZMQ PUB socket. Each message
has three frames: the topic (empty by default), the sequence number (8 bytes, big-endian,
counting from 0 per publisher) and a msgpack payload, vLLM's ``KVEventBatch`` (a msgspec
``Struct`` with ``array_like=True``): ``[ts, [event, ...], data_parallel_rank]``. vLLM 0.32
encodes each event as a map tagged by ``type``: ``BlockStored`` (``block_hashes``,
``parent_block_hash``, ``token_ids``, ``block_size``, ``lora_id``, ``medium``,
``lora_name``, then optional ``extra_keys``, ``group_idx``, …), ``BlockRemoved``
(``block_hashes``, ``medium``, …) and ``AllBlocksCleared``; older releases encoded events
as arrays with the tag first, in the same field order, and both are read. Only the first
KV cache group (``group_idx`` 0) is kept: a hybrid model's other groups store the same
token blocks again.

The engine's block hashes depend on its hash seed and algorithm, so the index does not use
them: ``EngineBlocks`` recomputes each stored block's hash from its token ids with
``prefix_index.token_blocks``' chaining (as llm-d does) and keeps engine hash → ours, to
apply ``BlockRemoved``. A request's own token ids, cut with ``token_blocks`` at the
events' ``block_size``, then match the blocks the engine holds. Blocks whose hash has
extra keys besides the LoRA name (multimodal inputs, ``cache_salt``, prompt embeds) get a
hash no plain token prefix has. Events of a LoRA adapter (``lora_name``) go to that
adapter's index.

A sequence gap (messages dropped past ZMQ's high-water mark, a publisher restart) or a
payload that does not decode (or apply) means events were lost: the endpoint's blocks are
cleared and the index rebuilds from the events that follow (a stored block whose parent is
unknown is skipped; vLLM's optional replay socket is not used).

``pyzmq`` and ``msgspec`` (vLLM's own msgpack codec) are imported only when a subscriber
runs or a payload is decoded, so importing ``router`` stays cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from router.prefix_index import ROOT, PrefixIndex

log = logging.getLogger("routeyard.kv_events")

#: An engine's block hash: 64-bit ints on vLLM 0.32 by default, sha256 bytes otherwise.
EngineHash = int | bytes

#: Positional field order of each event when encoded as an array (tag first).
_ARRAY_FIELDS = {
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size",
                    "lora_id", "medium", "lora_name", "extra_keys"),
    "BlockRemoved": ("block_hashes", "medium"),
    "AllBlocksCleared": (),
}


class EventError(ValueError):
    """A payload that is not a KV event batch."""


@dataclass(frozen=True, slots=True)
class Stored:
    """``BlockStored``: the engine cached these full blocks of ``token_ids``."""

    block_hashes: tuple[EngineHash, ...]
    parent_block_hash: EngineHash | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_name: str | None = None
    #: Per block, what else its hash covers (the LoRA name, multimodal ids, cache salt).
    extra_keys: tuple[Any, ...] | None = None


@dataclass(frozen=True, slots=True)
class Removed:
    """``BlockRemoved``: the engine evicted these blocks."""

    block_hashes: tuple[EngineHash, ...]


@dataclass(frozen=True, slots=True)
class Cleared:
    """``AllBlocksCleared``: the engine's prefix cache was reset."""


Event = Stored | Removed | Cleared


@dataclass(frozen=True, slots=True)
class Batch:
    """One published message: its time, events and data-parallel rank."""

    ts: float
    events: tuple[Event, ...]
    data_parallel_rank: int | None = None


def decode(payload: bytes) -> Batch:
    """A msgpack ``KVEventBatch``; ``EventError`` if it is not one. Events of kinds this
    router does not know are skipped."""
    import msgspec

    try:
        raw = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError as exc:
        raise EventError(f"not msgpack: {exc}") from exc
    if not isinstance(raw, list) or len(raw) < 2 or not isinstance(raw[1], list):
        raise EventError("not a [ts, events, data_parallel_rank] array")
    try:
        events = tuple(e for e in map(_event, raw[1]) if e is not None)
        rank = raw[2] if len(raw) > 2 else None
        return Batch(float(raw[0]), events, rank if isinstance(rank, int) else None)
    except (KeyError, TypeError, ValueError) as exc:
        raise EventError(f"malformed event: {exc!r}") from exc


def _event(raw: Any) -> Event | None:
    if isinstance(raw, dict):
        kind, fields = raw.get("type"), raw
    elif isinstance(raw, list) and raw and isinstance(raw[0], str):
        kind = raw[0]
        fields = dict(zip(_ARRAY_FIELDS.get(kind, ()), raw[1:], strict=False))
    else:
        raise TypeError(f"event {raw!r:.80}")
    if fields.get("group_idx") not in (None, 0):
        return None  # a hybrid model's other KV cache groups: the first one stands for all
    if kind == "BlockStored":
        block_size = fields["block_size"]
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size {block_size!r}")
        extra_keys = fields.get("extra_keys")
        return Stored(tuple(fields["block_hashes"]), fields.get("parent_block_hash"),
                      tuple(fields["token_ids"]), block_size, fields.get("lora_name"),
                      None if extra_keys is None else tuple(extra_keys))
    if kind == "BlockRemoved":
        return Removed(tuple(fields["block_hashes"]))
    if kind == "AllBlocksCleared":
        return Cleared()
    return None


class EngineBlocks:
    """What one engine (``endpoint``, the index's key for it) holds, kept in the indexes
    from its event batches in sequence order.

    ``index_for(lora_name)`` gives the index of the base model (``None``) or of an
    adapter, or None to ignore those blocks. ``max_blocks`` bounds the engine hash → ours
    map (the oldest go first; their blocks then age out of the index by its own LRU).
    """

    def __init__(self, endpoint: str, index_for: Callable[[str | None], PrefixIndex | None],
                 max_blocks: int) -> None:
        self.endpoint = endpoint
        self.index_for = index_for
        self.max_blocks = max_blocks
        #: The block size of the engine's events (None until the first ``BlockStored``):
        #: cut a request's token ids with ``token_blocks`` at this size.
        self.block_size: int | None = None
        #: The sequence number expected next; None before the first message.
        self.next_seq: int | None = None
        self.batches = 0
        #: Times events were lost (a gap, a restart, a bad payload) and the blocks cleared.
        self.resyncs = 0
        #: Stored blocks skipped because their parent block was unknown.
        self.orphans = 0
        self._ours: OrderedDict[EngineHash, tuple[int, PrefixIndex]] = OrderedDict()
        #: The indexes this engine's blocks went to (the base model's, adapters').
        self._touched: list[PrefixIndex] = []

    def message(self, seq: int, payload: bytes) -> None:
        """One ZMQ message (sequence number, payload): decoded and applied."""
        if self.next_seq is not None and seq != self.next_seq:
            log.warning("KV events of %s: sequence %d where %d was expected; its blocks are "
                        "cleared and rebuilt from the events that follow",
                        self.endpoint, seq, self.next_seq)
            self.resync()
        self.next_seq = seq + 1
        try:
            self.apply(decode(payload))
        except (EventError, TypeError, ValueError, IndexError) as exc:
            # events of the batch are lost (or half applied): start again from the next one
            log.warning("KV events of %s: payload %d refused (%r); its blocks are cleared",
                        self.endpoint, seq, exc)
            self.resync()

    def apply(self, batch: Batch) -> None:
        """The events of one batch, in order."""
        self.batches += 1
        for event in batch.events:
            if isinstance(event, Stored):
                self._stored(event)
            elif isinstance(event, Removed):
                self._removed(event)
            else:
                self.clear()

    def resync(self) -> None:
        """Events were lost: forget what the engine was thought to hold."""
        self.resyncs += 1
        self.clear()

    def clear(self) -> None:
        """The engine holds nothing (``AllBlocksCleared``, or a resync)."""
        for index in self._touched:
            index.cleared(self.endpoint)
        self._ours.clear()

    def _index(self, lora_name: str | None) -> PrefixIndex | None:
        index = self.index_for(lora_name)
        if index is not None and all(index is not seen for seen in self._touched):
            self._touched.append(index)
        return index

    def _stored(self, event: Stored) -> None:
        index = self._index(event.lora_name)
        if index is None:
            return
        ours = self._ours
        if event.parent_block_hash is None:
            parent = ROOT
        else:
            known = ours.get(event.parent_block_hash)
            if known is None:
                self.orphans += len(event.block_hashes)
                return
            parent = known[0]
        size = self.block_size = event.block_size
        tokens, extras = event.token_ids, event.extra_keys
        hashes: list[int] = []
        for i in range(len(event.block_hashes)):
            block = tuple(tokens[i * size:(i + 1) * size])
            if len(block) < size:
                break
            extra = extras[i] if extras is not None and i < len(extras) else None
            if extra and event.lora_name is not None and extra[0] == event.lora_name:
                extra = extra[1:]  # the adapter has its own index
            parent = hash((parent, block, repr(extra))) if extra else hash((parent, block))
            hashes.append(parent)
        # newest first as the index stores them, so both forget a prompt's tail first
        for engine_hash, block_hash in zip(reversed(event.block_hashes[:len(hashes)]),
                                           reversed(hashes), strict=True):
            ours[engine_hash] = (block_hash, index)
            ours.move_to_end(engine_hash)
        while len(ours) > self.max_blocks:
            ours.popitem(last=False)
        index.stored(self.endpoint, hashes)

    def _removed(self, event: Removed) -> None:
        ours = self._ours
        for engine_hash in event.block_hashes:
            known = ours.pop(engine_hash, None)
            if known is not None:
                known[1].removed(self.endpoint, (known[0],))


class KVEventSubscriber:
    """A ZMQ SUB to one engine's KV event publisher (``address``, e.g.
    ``tcp://10.0.0.5:5557``) feeding its ``EngineBlocks``. ZMQ reconnects by itself when
    the engine restarts (its sequence starts again at 0: a resync)."""

    def __init__(self, address: str, blocks: EngineBlocks, topic: bytes = b"") -> None:
        self.address = address
        self.blocks = blocks
        self.topic = topic
        self._task: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Task[None]:
        """Run in the background on the current event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self.run(), name=f"kv-events {self.blocks.endpoint}")
        return self._task

    async def run(self) -> None:
        """Receive and apply messages until cancelled."""
        import zmq
        import zmq.asyncio

        context = zmq.asyncio.Context.instance()
        socket = context.socket(zmq.SUB)
        try:
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.SUBSCRIBE, self.topic)
            socket.connect(self.address)
            while True:
                frames = await socket.recv_multipart()
                if len(frames) != 3 or len(frames[1]) != 8:
                    log.warning("KV events of %s: a message of %d frames refused",
                                self.blocks.endpoint, len(frames))
                    self.blocks.resync()
                    continue
                self.blocks.message(int.from_bytes(frames[1], "big", signed=True), frames[2])
        finally:
            socket.close(linger=0)

    async def close(self) -> None:
        """Stop receiving (the index keeps what it learned)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
