"""Load-balancing policies: each picks one available endpoint for a request.

A balancer is built from an immutable member list (at config load or DNS refresh) and
swapped whole. ``pick(key, exclude)`` returns the best endpoint that is up, has capacity
and is not in ``exclude`` (those already tried by this request), or None.

- ``round_robin``: smooth weighted round robin (nginx's): exact rotation for equal weights,
  proportional and evenly interleaved otherwise.
- ``least_request``: fewest requests in flight at this router, relative to weight.
- ``session``: consistent hashing of a session key (a header, else the body's ``user``);
  a backend that leaves moves only its own sessions.
- ``prefix``: consistent hashing of the prompt's first characters, so requests sharing a
  prefix reach the replica that has it in vLLM's prefix cache, with a bounded-load rule
  (no endpoint takes more than ``load_factor`` times the mean load) so a hot prefix
  cannot overload one replica.
- ``load_aware`` and ``cache_aware``: the highest weighted sum of scores over the engines'
  own state (``Scored``; the scorers and their formulas are in ``router.scoring``), never
  a saturated backend while another is below the thresholds, ``least_request`` when every
  candidate's reading is stale.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from router.config import SCORED
from router.prefix_index import PrefixIndex, text_blocks, within_bounded_load
from router.scoring import (
    KeyScorer,
    Thresholds,
    Weights,
    kv_cache_score,
    saturated,
    spread,
)

if TYPE_CHECKING:
    from router.config import ModelConfig
    from router.endpoint import Endpoint, Member

#: Points per unit of weight on the hash ring.
VNODES = 64


class Balancer(Protocol):
    def pick(self, key: str | None, exclude: set[Endpoint]) -> Endpoint | None: ...


def _usable(endpoint: Endpoint, exclude: set[Endpoint]) -> bool:
    return endpoint.up and endpoint.has_capacity and endpoint not in exclude


class RoundRobin:
    """Smooth weighted round robin over the usable members."""

    def __init__(self, members: Sequence[Member]) -> None:
        self.members = tuple(members)
        self.current = [0] * len(self.members)
        self.single = self.members[0].endpoint if len(self.members) == 1 else None

    def pick(self, key: str | None, exclude: set[Endpoint]) -> Endpoint | None:
        single = self.single
        if single is not None:
            return single if _usable(single, exclude) else None
        best = -1
        total = 0
        current = self.current
        for i, member in enumerate(self.members):
            if not _usable(member.endpoint, exclude):
                continue
            current[i] += member.weight
            total += member.weight
            if best < 0 or current[i] > current[best]:
                best = i
        if best < 0:
            return None
        current[best] -= total
        return self.members[best].endpoint


class LeastRequest:
    """The usable member with the fewest in flight per unit of weight (ties rotate)."""

    def __init__(self, members: Sequence[Member]) -> None:
        self.members = tuple(members)
        self.offset = 0

    def pick(self, key: str | None, exclude: set[Endpoint]) -> Endpoint | None:
        members = self.members
        n = len(members)
        self.offset = (self.offset + 1) % max(n, 1)
        best = None
        best_load = math.inf
        for j in range(n):
            member = members[(self.offset + j) % n]
            endpoint = member.endpoint
            if not _usable(endpoint, exclude):
                continue
            load = endpoint.in_flight / member.weight
            if load < best_load:
                best, best_load = endpoint, load
        return best


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class HashRing:
    """Consistent hashing over every configured member (up or not), so health changes
    move only the sessions of the endpoint that changed."""

    def __init__(self, members: Sequence[Member], fallback: Balancer) -> None:
        points = sorted(
            (_hash(f"{m.endpoint.key}#{i}"), idx)
            for idx, m in enumerate(members)
            for i in range(VNODES * m.weight)
        )
        self.hashes = [h for h, _ in points]
        self.owners = [idx for _, idx in points]
        self.members = tuple(members)
        self.fallback = fallback

    def walk(self, key: str) -> Iterator[Endpoint]:
        """Distinct endpoints clockwise from the key's point on the ring."""
        n = len(self.hashes)
        start = bisect.bisect(self.hashes, _hash(key))
        seen: set[int] = set()
        for step in range(n):
            idx = self.owners[(start + step) % n]
            if idx not in seen:
                seen.add(idx)
                yield self.members[idx].endpoint
                if len(seen) == len(self.members):
                    return

    def pick(self, key: str | None, exclude: set[Endpoint]) -> Endpoint | None:
        if key is None or not self.hashes:
            return self.fallback.pick(None, exclude)
        for endpoint in self.walk(key):
            if _usable(endpoint, exclude):
                return endpoint
        return None


class BoundedPrefix(HashRing):
    """Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018)."""

    def __init__(self, members: Sequence[Member], fallback: Balancer, load_factor: float):
        super().__init__(members, fallback)
        self.load_factor = load_factor

    def pick(self, key: str | None, exclude: set[Endpoint]) -> Endpoint | None:
        if key is None or not self.hashes:
            return self.fallback.pick(None, exclude)
        up = [m.endpoint for m in self.members if m.endpoint.up]
        if not up:
            return None
        total = sum(e.in_flight for e in up) + 1
        bound = math.ceil(self.load_factor * total / len(up))
        for endpoint in self.walk(key):
            if _usable(endpoint, exclude) and endpoint.in_flight < bound:
                return endpoint
        return self.fallback.pick(None, exclude)


class PreferredOnRing:
    """The ``KeyScorer`` built in: 1 for the candidate the key's consistent hash prefers
    (the first candidate clockwise from the key on the ring), 0 for the others."""

    def __init__(self, members: Sequence[Member]) -> None:
        self.ring = HashRing(members, RoundRobin(members))

    def scores(self, key: str, candidates: Sequence[Endpoint]) -> Mapping[Endpoint, float]:
        for endpoint in self.ring.walk(key):
            if endpoint in candidates:
                return {endpoint: 1.0}
        return {}

    def picked(self, key: str, endpoint: Endpoint) -> None:
        """The ring is fixed by the members: nothing to learn."""


class CachedPrefix:
    """The ``KeyScorer`` of ``cache_aware``: the share of the prompt's leading blocks each
    candidate holds by the model's prefix index (matched blocks / prompt blocks, as
    llm-d's prefix scorer). The index learns from the router's own picks (approximate
    mode: a backend holds what it was last sent, aged out least recently used first).

    Bounded load: a candidate that would go above ``load_factor`` times the mean
    in-flight load with this request scores 0, so a system prompt shared by many
    sessions spreads over backends instead of piling on the one that has it."""

    def __init__(self, index: PrefixIndex, block_chars: int, load_factor: float) -> None:
        self.index = index
        self.block_chars = block_chars
        self.load_factor = load_factor
        #: The last key hashed and its blocks: ``picked`` follows ``scores`` at once.
        self.last: tuple[str, list[int]] = ("", [])

    def _blocks(self, key: str) -> list[int]:
        last_key, blocks = self.last
        if last_key is not key:
            blocks = text_blocks(key, self.block_chars)
            self.last = (key, blocks)
        return blocks

    def scores(self, key: str, candidates: Sequence[Endpoint]) -> Mapping[Endpoint, float]:
        blocks = self._blocks(key)
        if not blocks:
            return {}
        held = self.index.match(blocks)
        if not held:
            return {}
        room = within_bounded_load([e.in_flight for e in candidates], self.load_factor)
        total = len(blocks)
        return {e: held[e.key] / total for e, ok in zip(candidates, room, strict=True)
                if ok and e.key in held}

    def picked(self, key: str, endpoint: Endpoint) -> None:
        blocks = self._blocks(key)
        if blocks:
            self.index.record(endpoint.key, blocks)


class Scored:
    """``load_aware`` and ``cache_aware``: the candidate with the highest weighted sum of
    scores (``router.scoring``), ties to the first in an order that rotates every pick.

    Candidates are the usable members (up, with capacity, not tried) whose engine reading
    is fresh (at most ``max_age`` old) and not saturated. None left: while some are
    saturated (a stale reading counts as saturated), None, so the request waits in the
    model's queue; when every usable member is stale, ``least_request`` picks."""

    def __init__(self, members: Sequence[Member], weights: Weights, thresholds: Thresholds,
                 key_scorer: KeyScorer[Endpoint] | None, explain: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.members = tuple(members)
        self.fallback = LeastRequest(members)
        self.weights = weights
        self.thresholds = thresholds
        self.key_scorer = key_scorer if weights.key else None
        self.explain = explain
        self.clock = clock
        self.offset = 0
        #: With ``explain``: the endpoint of the last pick and the scores of that pick.
        self.explained: tuple[Endpoint | None, str] = (None, "")

    def may_take(self, endpoint: Endpoint) -> bool:
        """Whether ``endpoint``'s reading lets it be picked, or leaves the choice to the
        stale rule: a fresh reading below the thresholds, or a stale one."""
        load = endpoint.load
        return (not load.fresh(self.clock(), self.thresholds.max_age)
                or not saturated(load, self.thresholds))

    def pick(self, key: str | None, exclude: set[Endpoint]) -> Endpoint | None:
        members = self.members
        n = len(members)
        if not n:
            return None
        now = self.clock()
        thresholds = self.thresholds
        max_age = thresholds.max_age
        self.offset = start = (self.offset + 1) % n
        candidates: list[Member] = []
        queues: list[int] = []
        stale = full = 0
        for j in range(n):
            member = members[(start + j) % n]
            endpoint = member.endpoint
            if not _usable(endpoint, exclude):
                continue
            load = endpoint.load
            if not load.fresh(now, max_age):
                stale += 1
            elif saturated(load, thresholds):
                full += 1
            else:
                candidates.append(member)
                queues.append(load.queue(endpoint.in_flight))
        if not candidates:
            if stale and not full:
                picked = self.fallback.pick(None, exclude)
                if self.explain:
                    self.explained = (picked, "every reading stale: least_request")
                return picked
            if self.explain:
                self.explained = (None, "")
            return None
        scorer = self.key_scorer if key else None
        text = key or ""
        if len(candidates) == 1 and not self.explain:
            if scorer is not None:
                scorer.picked(text, candidates[0].endpoint)
            return candidates[0].endpoint
        weights = self.weights
        lo_q, hi_q = min(queues), max(queues)
        flights = [m.endpoint.in_flight / m.weight for m in candidates]
        lo_f, hi_f = min(flights), max(flights)
        keyed = (scorer.scores(text, [m.endpoint for m in candidates])
                 if scorer is not None else None)
        best = -1.0
        best_at = 0
        for i, member in enumerate(candidates):
            endpoint = member.endpoint
            score = (weights.queue * spread(queues[i], lo_q, hi_q)
                     + weights.kv_cache * kv_cache_score(endpoint.load.kv_cache)
                     + weights.in_flight * spread(flights[i], lo_f, hi_f))
            if keyed:
                score += weights.key * keyed.get(endpoint, 0.0)
            if score > best:
                best, best_at = score, i
        picked = candidates[best_at].endpoint
        if scorer is not None:
            scorer.picked(text, picked)
        if self.explain:
            self.explained = (picked, self._explain(candidates, queues, flights, keyed,
                                                    exclude, now))
        return picked

    def _explain(self, candidates: list[Member], queues: list[int], flights: list[float],
                 keyed: Mapping[Endpoint, float] | None, exclude: set[Endpoint],
                 now: float) -> str:
        """Each candidate's scores, best first, then the members left out and why:
        ``0 total=4.50 queue=1.00 kv_cache=0.75 in_flight=1.00 key=0.00; 1 saturated``."""
        weights = self.weights
        lo_q, hi_q = min(queues), max(queues)
        lo_f, hi_f = min(flights), max(flights)
        rows = []
        for i, member in enumerate(candidates):
            endpoint = member.endpoint
            parts = (spread(queues[i], lo_q, hi_q), kv_cache_score(endpoint.load.kv_cache),
                     spread(flights[i], lo_f, hi_f),
                     keyed.get(endpoint, 0.0) if keyed else 0.0)
            total = sum(w * p for w, p in zip(weights, parts, strict=True))
            rows.append((-total, i, f"{member.name} total={total:.2f} queue={parts[0]:.2f} "
                         f"kv_cache={parts[1]:.2f} in_flight={parts[2]:.2f} "
                         f"key={parts[3]:.2f}"))
        text = [row for _, _, row in sorted(rows)]
        chosen = {m.endpoint for m in candidates}
        for member in self.members:
            endpoint = member.endpoint
            if endpoint in chosen:
                continue
            if not _usable(endpoint, exclude):
                why = "unavailable"
            elif not endpoint.load.fresh(now, self.thresholds.max_age):
                why = "stale"
            else:
                why = "saturated"
            text.append(f"{member.name} {why}")
        return "; ".join(text)


def make_balancer(config: ModelConfig, members: Sequence[Member],
                  clock: Callable[[], float] = time.monotonic,
                  prefix_index: PrefixIndex | None = None) -> Balancer:
    """The model's policy over ``members``; ``cache_aware`` scores prompts by
    ``prefix_index`` (without one, by the prompt prefix's consistent hash)."""
    if config.policy in SCORED:
        scoring = config.scoring
        w = scoring.weights
        key_weight = w.prefix if config.policy == "cache_aware" else w.session
        thresholds = Thresholds(scoring.saturation.queue, scoring.saturation.kv_cache,
                                config.engine_metrics.max_age)
        key_scorer: KeyScorer[Endpoint] | None = None
        if key_weight and prefix_index is not None:
            key_scorer = CachedPrefix(prefix_index, config.prefix.block_chars,
                                      config.prefix.load_factor)
        elif key_weight:
            key_scorer = PreferredOnRing(members)
        return Scored(members, Weights(w.queue, w.kv_cache, w.in_flight, key_weight),
                      thresholds, key_scorer, scoring.explain, clock)
    if config.policy == "least_request":
        return LeastRequest(members)
    if config.policy == "session":
        return HashRing(members, RoundRobin(members))
    if config.policy == "prefix":
        return BoundedPrefix(members, LeastRequest(members), config.prefix.load_factor)
    return RoundRobin(members)
