"""Prefix-cache affinity: which backend holds which prompt blocks, per model.

A prompt is cut into whole blocks and each block gets a *chained* hash: block i's hash
covers block i-1's, so two prompts share a block hash only if they share everything up to
and including that block, and a match is always a prefix. Two ways to cut a prompt:

- ``text_blocks(text, block_chars)``: blocks of characters, for the *approximate* mode
  (the index learns from the router's own routing history: ``PrefixIndex.record`` after
  each pick). Pick ``block_chars`` near the engine's block size in tokens times the
  characters per token (``CHARS_PER_TOKEN``). Uses Python's ``hash`` of ``str``, which is
  salted per process: the hashes are comparable only inside one worker, which is all a
  per-worker index needs (never persist them or share them between processes).
- ``token_blocks(token_ids, block_size)``: blocks of token ids, for the *precise* mode
  (the index learns from the engines' KV events, ``router.kv_events``, which carry the
  token ids of every block stored; the request's own token ids come from the engine's
  ``/tokenize`` or a local tokenizer). Hashes of tuples of ints are not salted, so these
  agree across processes. They are ours, not the engine's (vLLM's depend on its hash
  seed); ``kv_events`` recomputes them from the events' token ids.

``PrefixIndex`` maps block hash → the endpoints (by key) holding it, in least-recently-used
order, with a hard bound on the blocks held and, optionally, a per-endpoint bound that
mimics the engine's own LRU eviction (approximate mode). Every call costs O(blocks of the
prompt). ``prefix_scores`` turns a match into llm-d's prefix scorer (matched blocks / prompt
blocks). ``PrefixIndexes`` keeps one index per model across config reloads.

Bounded load: prefix affinity alone sends every session that shares a long system prompt
to the first backend that served it. A weighted sum with a load scorer does not prevent
that (with ``prefix`` 3 and ``load`` 2, a 20-block shared prefix out of 22 scores 2.7,
more than the 2 an idle backend gets from load). Filter the candidates with
``within_bounded_load`` first (no endpoint above ``load_factor`` times the mean load, as
the ``prefix`` policy's consistent hashing does), then score the ones left.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from itertools import islice

#: Characters per token for sizing ``text_blocks`` from an engine's block size (tokens).
CHARS_PER_TOKEN = 4

#: The parent hash of a prompt's first block.
ROOT = 0


def text_blocks(text: str, block_chars: int) -> list[int]:
    """Chained hashes of the whole ``block_chars``-character blocks of ``text`` (a tail
    shorter than a block is not hashed)."""
    if block_chars < 1:
        raise ValueError(f"block_chars must be at least 1, not {block_chars}")
    hashes: list[int] = []
    append = hashes.append
    parent = ROOT
    for start in range(0, len(text) - block_chars + 1, block_chars):
        parent = hash((parent, text[start:start + block_chars]))
        append(parent)
    return hashes


def token_blocks(token_ids: Sequence[int], block_size: int, parent: int = ROOT) -> list[int]:
    """Chained hashes of the whole ``block_size``-token blocks of ``token_ids``; ``parent``
    is the hash of the block before the first one (``ROOT`` at the prompt's start)."""
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, not {block_size}")
    hashes: list[int] = []
    append = hashes.append
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(token_ids[start:start + block_size])))
        append(parent)
    return hashes


class PrefixIndex:
    """One model's blocks: block hash → endpoint keys holding it, least recently used first.

    ``max_blocks`` bounds the distinct blocks held (the least recently used block is
    forgotten past it, for every endpoint); ``per_endpoint`` optionally bounds the blocks
    one endpoint is thought to hold (its least recently used go first), as the engine's
    KV cache would evict them; it applies to ``record`` and ``stored`` alike.
    """

    __slots__ = ("_held", "_holders", "max_blocks", "per_endpoint")

    def __init__(self, max_blocks: int, per_endpoint: int | None = None) -> None:
        if max_blocks < 1:
            raise ValueError(f"max_blocks must be at least 1, not {max_blocks}")
        if per_endpoint is not None and per_endpoint < 1:
            raise ValueError(f"per_endpoint must be at least 1, not {per_endpoint}")
        self.max_blocks = max_blocks
        self.per_endpoint = per_endpoint
        #: block hash → the endpoints holding it (a tuple: a block has few holders, and a
        #: small set costs four times the memory); least recently used first.
        self._holders: OrderedDict[int, tuple[str, ...]] = OrderedDict()
        #: endpoint → the blocks it holds; least recently used first.
        self._held: dict[str, OrderedDict[int, None]] = {}

    def __len__(self) -> int:
        """Distinct blocks held (the ``routeyard_prefix_index_blocks`` gauge)."""
        return len(self._holders)

    def endpoints(self) -> list[str]:
        """The endpoints that hold at least one block."""
        return list(self._held)

    def held_by(self, endpoint: str) -> int:
        """How many blocks ``endpoint`` holds."""
        held = self._held.get(endpoint)
        return len(held) if held is not None else 0

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Per endpoint holding the first block, how many leading blocks of ``hashes`` it
        holds; stops at the first block that no endpoint still in the race holds."""
        found: dict[str, int] = {}
        if not hashes:
            return found
        holders = self._holders.get(hashes[0])
        if not holders:
            return found
        live = set(holders)
        depth = 1
        get = self._holders.get
        for block in islice(hashes, 1, None):
            holders = get(block)
            if holders is None:
                break
            for endpoint in live:
                if endpoint not in holders:
                    break
            else:  # every endpoint still in the race holds this block too
                depth += 1
                continue
            dropped = [endpoint for endpoint in live if endpoint not in holders]
            for endpoint in dropped:
                found[endpoint] = depth
            live.difference_update(dropped)
            if not live:
                break
            depth += 1
        for endpoint in live:
            found[endpoint] = depth
        return found

    def record(self, endpoint: str, hashes: Sequence[int]) -> None:
        """The router sent a prompt of these blocks to ``endpoint`` (approximate mode)."""
        self.stored(endpoint, hashes)

    def stored(self, endpoint: str, hashes: Sequence[int]) -> None:
        """``endpoint`` holds these blocks now (a KV ``BlockStored`` event, or a routed
        request). They become its most recently used, the first block last, so that LRU
        ageing forgets a prompt's tail before its head, as vLLM evicts."""
        if not hashes:
            return
        holders_of = self._holders
        held = self._held.get(endpoint)
        if held is None:
            held = self._held[endpoint] = OrderedDict()
        for block in reversed(hashes):
            holders = holders_of.get(block)
            if holders is None:
                holders_of[block] = (endpoint,)
            else:
                if endpoint not in holders:
                    holders_of[block] = (*holders, endpoint)
                holders_of.move_to_end(block)
            if block in held:
                held.move_to_end(block)
            else:
                held[block] = None
        per_endpoint = self.per_endpoint
        if per_endpoint is not None:
            while len(held) > per_endpoint:
                block, _ = held.popitem(last=False)
                self._drop(block, endpoint)
        while len(holders_of) > self.max_blocks:
            block, gone = holders_of.popitem(last=False)
            for owner in gone:
                owned = self._held.get(owner)
                if owned is not None:
                    owned.pop(block, None)
                    if not owned:
                        del self._held[owner]

    def removed(self, endpoint: str, hashes: Iterable[int]) -> None:
        """``endpoint`` evicted these blocks (a KV ``BlockRemoved`` event)."""
        held = self._held.get(endpoint)
        if held is None:
            return
        for block in hashes:
            if block in held:
                del held[block]
                self._drop(block, endpoint)
        if not held:
            del self._held[endpoint]

    def cleared(self, endpoint: str) -> None:
        """``endpoint`` holds nothing any more (``AllBlocksCleared``, a lost event, a
        restart)."""
        held = self._held.pop(endpoint, None)
        if held is not None:
            for block in held:
                self._drop(block, endpoint)

    def forget(self, endpoint: str) -> None:
        """``endpoint`` left the model's backends."""
        self.cleared(endpoint)

    def retain(self, endpoints: Iterable[str]) -> None:
        """Forget every endpoint not in ``endpoints`` (after a reload or DNS refresh)."""
        keep = set(endpoints)
        for endpoint in [e for e in self._held if e not in keep]:
            self.cleared(endpoint)

    def resize(self, max_blocks: int, per_endpoint: int | None = None) -> None:
        """New bounds (a reload changed them); shrinking forgets the least recently used."""
        if max_blocks < 1:
            raise ValueError(f"max_blocks must be at least 1, not {max_blocks}")
        self.max_blocks = max_blocks
        self.per_endpoint = per_endpoint
        while len(self._holders) > max_blocks:
            block, gone = self._holders.popitem(last=False)
            for owner in gone:
                owned = self._held[owner]
                del owned[block]
                if not owned:
                    del self._held[owner]
        if per_endpoint is not None:
            for endpoint, held in list(self._held.items()):
                while len(held) > per_endpoint:
                    block, _ = held.popitem(last=False)
                    self._drop(block, endpoint)
                if not held:
                    del self._held[endpoint]

    def _drop(self, block: int, endpoint: str) -> None:
        """``endpoint`` no longer holds ``block``; a block nobody holds is forgotten."""
        holders = self._holders.get(block)
        if holders is not None:
            if holders == (endpoint,):
                del self._holders[block]
            elif endpoint in holders:
                self._holders[block] = tuple(e for e in holders if e != endpoint)


def prefix_scores(index: PrefixIndex, hashes: Sequence[int],
                  endpoint_keys: Sequence[str]) -> list[float]:
    """Per endpoint of ``endpoint_keys``, in order: leading blocks of ``hashes`` it holds
    / blocks of the prompt, 0..1 (llm-d's prefix scorer); all 0 for a prompt shorter than
    one block."""
    total = len(hashes)
    if not total:
        return [0.0] * len(endpoint_keys)
    matched = index.match(hashes)
    if not matched:
        return [0.0] * len(endpoint_keys)
    get = matched.get
    return [get(key, 0) / total for key in endpoint_keys]


def within_bounded_load(in_flight: Sequence[int], load_factor: float) -> list[bool]:
    """Which endpoints may take one more request under bounded load: taking it would not
    put one above ``ceil(load_factor * mean load)`` counting that request (consistent
    hashing with bounded loads, Mirrokni et al.). At least one endpoint always may."""
    if load_factor < 1.0:
        raise ValueError(f"load_factor must be at least 1, not {load_factor}")
    count = len(in_flight)
    if not count:
        return []
    bound = math.ceil(load_factor * (sum(in_flight) + 1) / count)
    return [load + 1 <= bound for load in in_flight]


class PrefixIndexes:
    """Model name → its ``PrefixIndex``, kept across config reloads (hang it on the
    ``ConfigHolder`` as the endpoint registry is)."""

    __slots__ = ("by_model",)

    def __init__(self) -> None:
        self.by_model: dict[str, PrefixIndex] = {}

    def get(self, model: str, max_blocks: int, per_endpoint: int | None = None
            ) -> PrefixIndex:
        """The index of ``model``, made on first use; bounds that changed since are
        applied (a smaller bound forgets the least recently used blocks)."""
        index = self.by_model.get(model)
        if index is None:
            index = self.by_model[model] = PrefixIndex(max_blocks, per_endpoint)
        elif index.max_blocks != max_blocks or index.per_endpoint != per_endpoint:
            index.resize(max_blocks, per_endpoint)
        return index

    def retain(self, models: Iterable[str]) -> None:
        """Drop the indexes of models no longer configured."""
        keep = set(models)
        for model in [m for m in self.by_model if m not in keep]:
            del self.by_model[model]

    def sizes(self) -> list[tuple[str, int]]:
        """(model, blocks held) of each index, for the metrics' once-a-second sampling."""
        return [(model, len(index)) for model, index in self.by_model.items()]
