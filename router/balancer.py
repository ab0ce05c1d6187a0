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
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

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


def make_balancer(config: ModelConfig, members: Sequence[Member]) -> Balancer:
    if config.policy == "least_request":
        return LeastRequest(members)
    if config.policy == "session":
        return HashRing(members, RoundRobin(members))
    if config.policy == "prefix":
        return BoundedPrefix(members, LeastRequest(members), config.prefix.load_factor)
    return RoundRobin(members)
