"""A serving model of one vLLM engine: batch slots, a waiting queue, a paged KV cache with
prefix caching and LRU eviction, and the cost of each scheduler step.

Pure and synchronous (no clock, no I/O): ``schedule`` plans the next step and says how
long it takes; ``complete`` applies it (tokens generated, sequences finished). The
engine's driver (``simulated``) sleeps between the two.

The model follows vLLM V1's scheduler in the parts that decide latency:

* **Slots**: at most ``max_num_seqs`` sequences run; the rest wait, first come first served.
* **Token budget**: a step computes at most ``max_num_batched_tokens`` tokens: one for
  every decoding sequence, then chunks of prompts still being prefilled (chunked prefill),
  oldest first; a waiting sequence is admitted while slots, budget and KV blocks allow.
* **KV cache**: ``num_blocks`` blocks of ``block_size`` tokens. A prompt's full blocks are
  named by chained hashes of their token ids (block *i*'s hash covers blocks 0..*i*), so a
  block is shared only by prompts with the same tokens up to its end. At admission the
  longest run of cached leading blocks is a hit (at least the last prompt token is always
  computed, as vLLM does); the rest is allocated and each block is published to the cache
  once its prefill is done. Blocks for the output are reserved at admission (this model
  never preempts). A finished sequence's prompt blocks stay cached, unreferenced, in an
  LRU list (deepest block first, as vLLM frees them) and are evicted only when an
  allocation needs room.
* **Step time** = ``step_base_s`` + ``step_per_seq_s`` * decoding sequences +
  ``prefill_s_per_token`` * prompt tokens computed in the step.

Counters follow vLLM's metrics: prefix-cache queries and hits in tokens (hits are whole
blocks), requests finished, prompt and generated tokens.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

#: Whitespace-separated words map to ids in a vocabulary of this size (Llama 3's).
VOCAB_SIZE = 128_256


def token_ids(text: str) -> list[int]:
    """The simulator's tokenizer: one token per whitespace-separated word, its id a CRC-32
    of the word modulo the vocabulary."""
    return [zlib.crc32(word.encode()) % VOCAB_SIZE for word in text.split()]


@dataclass(frozen=True, slots=True)
class ServingParams:
    """The engine's shape and costs. Defaults: an 8B model (Llama-3.1-8B, BF16) on one
    80 GB H100, vLLM's defaults otherwise (``docs/performance.md`` gives the sources)."""

    block_size: int = 16
    num_blocks: int = 27_000
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    prefill_s_per_token: float = 1 / 15_000
    step_base_s: float = 0.007
    step_per_seq_s: float = 0.000_03
    #: Real seconds per simulated second (0.5: the engine runs twice as fast as real time).
    time_scale: float = 1.0
    #: Tokens per streamed chunk after the first (vLLM's ``--stream-interval``).
    stream_interval: int = 1

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value <= 0:
                raise ValueError(f"serving {f.name}={value!r}: must be greater than 0")

    @classmethod
    def parse(cls, assignments: Sequence[str]) -> ServingParams:
        """``["max_num_seqs=32", "time_scale=0.5"]`` over the defaults; ValueError names the
        bad one."""
        types = {f.name: f.type for f in fields(cls)}
        changes: dict[str, Any] = {}
        for text in assignments:
            name, sep, raw = text.partition("=")
            name = name.strip()
            if not sep or name not in types:
                raise ValueError(f"--serving {text!r}: expected NAME=VALUE with NAME one of "
                                 f"{', '.join(types)}")
            try:
                changes[name] = int(raw) if types[name] == "int" else float(raw)
            except ValueError:
                raise ValueError(f"--serving {text!r}: {raw!r} is not a "
                                 f"{types[name]}") from None
        return replace(cls(), **changes)

    @property
    def kv_cache_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def step_s(self, decoding: int, prefill_tokens: int) -> float:
        return (self.step_base_s + self.step_per_seq_s * decoding
                + self.prefill_s_per_token * prefill_tokens)


@dataclass(eq=False, slots=True)
class EngineRequest:
    """One request inside the engine."""

    prompt: list[int]
    max_tokens: int
    hashes: list[int]
    #: Called after each step that changed this sequence (a token, the end).
    listener: Callable[[], None] | None = None
    cached_tokens: int = 0
    computed: int = 0  # prompt tokens whose KV exists (hits included)
    generated: int = 0
    finished: bool = False
    aborted: bool = False
    #: Hashes of the prompt blocks this sequence holds a reference to, in order.
    held: list[int] = field(default_factory=list)
    private: int = 0  # blocks allocated and not (yet) in the cache

    @property
    def prefilled(self) -> bool:
        return self.computed >= len(self.prompt)


def block_hashes(ids: Sequence[int], block_size: int) -> list[int]:
    """Chained hashes of the full blocks of ``ids``."""
    out: list[int] = []
    parent = 0
    for start in range(0, len(ids) - block_size + 1, block_size):
        parent = hash((parent, *ids[start:start + block_size]))
        out.append(parent)
    return out


class KVCache:
    """``num_blocks`` blocks: cached prompt blocks (by hash, with reference counts, the
    unreferenced ones in LRU order) and private blocks (uncached prompt tails, outputs)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.refs: dict[int, int] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.private = 0
        self.evicted = 0

    @property
    def used(self) -> int:
        """Blocks referenced by running sequences (what vLLM's usage gauge counts)."""
        return len(self.refs) - len(self.lru) + self.private

    def free(self) -> int:
        """Blocks an allocation can take, evicting unreferenced cached blocks."""
        return self.num_blocks - self.used

    def match(self, hashes: Sequence[int], limit: int) -> int:
        """How many of the first ``limit`` hashes are cached, in a run from the first."""
        n = 0
        refs = self.refs
        while n < limit and hashes[n] in refs:
            n += 1
        return n

    def take(self, hits: Sequence[int], count: int) -> bool:
        """Reference the cached blocks ``hits`` and allocate ``count`` private blocks,
        evicting least recently used unreferenced blocks (never one of ``hits``); False,
        with nothing changed, when there is not room."""
        evictable_hits = sum(1 for h in hits if self.refs[h] == 0)
        if count > self.free() - evictable_hits:
            return False
        for h in hits:
            n = self.refs[h]
            if n == 0:
                del self.lru[h]
            self.refs[h] = n + 1
        while self.num_blocks - len(self.refs) - self.private < count:
            victim, _ = self.lru.popitem(last=False)
            del self.refs[victim]
            self.evicted += 1
        self.private += count
        return True

    def publish(self, h: int) -> None:
        """A private block of a prompt is computed: it becomes cached block ``h`` (or, if
        another sequence published ``h`` first, a reference to that one)."""
        self.private -= 1
        count = self.refs.get(h)
        if count is None:
            self.refs[h] = 1
            return
        if count == 0:
            del self.lru[h]
        self.refs[h] = count + 1

    def release(self, held: Sequence[int], private: int) -> None:
        """A sequence ends: its private blocks are freed, its cached ones unreferenced
        (deepest first into the LRU list, so a prompt's tail is evicted before its head)."""
        self.private -= private
        for h in reversed(held):
            count = self.refs[h] - 1
            self.refs[h] = count
            if count == 0:
                self.lru[h] = None

    def clear(self) -> bool:
        """Drop every unreferenced cached block (vLLM's ``/reset_prefix_cache``); False
        while running sequences hold blocks, as vLLM refuses then."""
        if len(self.refs) != len(self.lru):
            return False
        self.refs.clear()
        self.lru.clear()
        return True


@dataclass(slots=True)
class Step:
    """A planned step: what it computes and how long it takes (simulated seconds)."""

    duration_s: float
    decoding: list[EngineRequest]
    prefill: list[tuple[EngineRequest, int]]  # (sequence, prompt tokens computed now)


@dataclass(slots=True)
class Counters:
    prefix_queries: int = 0
    prefix_hits: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: int = 0


class ServingModel:
    """One engine's scheduler and KV cache."""

    def __init__(self, params: ServingParams) -> None:
        self.params = params
        self.cache = KVCache(params.num_blocks)
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []
        self.counters = Counters()

    def submit(self, prompt: list[int], max_tokens: int,
               listener: Callable[[], None] | None = None) -> EngineRequest:
        """Queue a request (``max_tokens`` ≥ 1 tokens are generated)."""
        hashes = block_hashes(prompt, self.params.block_size)
        seq = EngineRequest(prompt, max(1, max_tokens), hashes, listener)
        self.waiting.append(seq)
        return seq

    def abort(self, seq: EngineRequest) -> None:
        """The client left: a waiting sequence leaves the queue, a running one is freed."""
        if seq.finished or seq.aborted:
            return
        seq.aborted = True
        if seq in self.running:
            self.running.remove(seq)
            self.cache.release(seq.held, seq.private)
        else:
            self.waiting.remove(seq)

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    def kv_usage(self) -> float:
        return self.cache.used / self.cache.num_blocks

    def schedule(self) -> Step | None:
        """Plan the next step: decodes, prefill chunks, admissions. None when idle."""
        p = self.params
        budget = p.max_num_batched_tokens
        decoding = [s for s in self.running if s.prefilled]
        budget -= len(decoding)
        prefill: list[tuple[EngineRequest, int]] = []
        for seq in self.running:
            if budget <= 0:
                break
            if not seq.prefilled:
                chunk = min(len(seq.prompt) - seq.computed, budget)
                prefill.append((seq, chunk))
                budget -= chunk
        while self.waiting and budget > 0 and len(self.running) < p.max_num_seqs:
            seq = self.waiting[0]
            if not self._admit(seq):
                break  # FIFO: no one overtakes the head of the queue
            self.waiting.popleft()
            self.running.append(seq)
            chunk = min(len(seq.prompt) - seq.computed, budget)
            prefill.append((seq, chunk))
            budget -= chunk
        if not decoding and not prefill:
            return None
        tokens = sum(chunk for _, chunk in prefill)
        return Step(p.step_s(len(decoding), tokens), decoding, prefill)

    def _admit(self, seq: EngineRequest) -> bool:
        bs = self.params.block_size
        prompt_blocks = -(-len(seq.prompt) // bs)
        output_blocks = -(-(len(seq.prompt) + seq.max_tokens) // bs) - prompt_blocks
        # The last prompt token is always computed, so a fully cached prompt hits all but
        # the block that holds it.
        hits = self.cache.match(seq.hashes, (len(seq.prompt) - 1) // bs)
        held = seq.hashes[:hits]
        if not self.cache.take(held, prompt_blocks - hits + output_blocks):
            return False
        seq.held = held
        seq.private = prompt_blocks - hits + output_blocks
        seq.cached_tokens = seq.computed = hits * bs
        c = self.counters
        c.prefix_queries += len(seq.prompt)
        c.prefix_hits += seq.cached_tokens
        c.prompt_tokens += len(seq.prompt)
        return True

    def complete(self, step: Step) -> list[EngineRequest]:
        """Apply a planned step; return the sequences that changed (a token or the end)."""
        bs = self.params.block_size
        changed: list[EngineRequest] = []
        for seq in step.decoding:
            if seq.aborted:
                continue
            seq.generated += 1
            changed.append(seq)
        for seq, chunk in step.prefill:
            if seq.aborted:
                continue
            before = seq.computed // bs
            seq.computed += chunk
            for i in range(before, min(seq.computed // bs, len(seq.hashes))):
                self.cache.publish(seq.hashes[i])
                seq.held.append(seq.hashes[i])
                seq.private -= 1
            if seq.prefilled:
                seq.generated = 1  # the prefill step samples the first token
                changed.append(seq)
        c = self.counters
        for seq in changed:
            c.generation_tokens += 1
            if seq.generated >= seq.max_tokens:
                seq.finished = True
                self.running.remove(seq)
                self.cache.release(seq.held, seq.private)
                c.finished += 1
        for seq in changed:
            if seq.listener is not None:
                seq.listener()
        return changed
