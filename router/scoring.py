"""The scorers of ``load_aware`` and ``cache_aware``: each gives a candidate 0..1.

A scored balancer (``router.balancer.Scored``) sums, per candidate, each scorer's value
times its weight (``scoring.weights``) and picks the highest sum; equal sums go to the first
candidate in an order that rotates by one every pick, so ties spread. The formulas:

- ``queue``: ``(hi - q) / (hi - lo)`` with ``q`` the candidate's effective queue
  (``EngineLoad.queue``: the engine's waiting and running requests plus this worker's
  dispatches there since the scrape, net of completions) and ``lo``, ``hi`` the smallest
  and largest ``q`` among the candidates; 1 for all when they are equal (llm-d's queue
  scorer, with the router's credit).
- ``kv_cache``: ``1 - usage`` (``vllm:kv_cache_usage_perc``).
- ``in_flight``: the same spread over this worker's requests in flight per unit of weight.
- ``prefix`` and ``session``: a ``KeyScorer`` over the request's key (the prompt's first
  ``prefix.chars`` characters, the session id). The one built in
  (``router.balancer.PreferredOnRing``) gives 1 to the candidate the key's consistent hash
  prefers and 0 to the others; a prefix-cache index may give matched blocks / prompt
  blocks instead, through the same protocol (``picked`` tells it where each keyed request
  went).

``saturated`` is the rule that keeps a full engine out while another has room.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import NamedTuple, Protocol, TypeVar

from router.engine_load import EngineLoad

E = TypeVar("E", bound=Hashable)


def spread(value: float, lo: float, hi: float) -> float:
    """``(hi - value) / (hi - lo)``: 1 for the least loaded, 0 for the most; 1 for all when
    they are equal."""
    return 1.0 if hi <= lo else (hi - value) / (hi - lo)


def kv_cache_score(usage: float) -> float:
    """``1 - usage``, usage clamped to 0..1."""
    return 1.0 - min(max(usage, 0.0), 1.0)


class Thresholds(NamedTuple):
    """``scoring.saturation``, and the age past which a reading counts as saturated."""

    queue: int
    kv_cache: float
    max_age: float


def saturated(load: EngineLoad, thresholds: Thresholds) -> bool:
    """Whether the engine's last reading says it is full: its waiting queue or its KV-cache
    use at a threshold. The router's own dispatches since do not count here (they change
    the scores): an engine's free batch slots are not in its metrics, so counting them
    would hold back bursts an idle engine can take."""
    return load.waiting >= thresholds.queue or load.kv_cache >= thresholds.kv_cache


class KeyScorer(Protocol[E]):
    """Scores candidates by the request's key (``prefix``, ``session``)."""

    def scores(self, key: str, candidates: Sequence[E]) -> Mapping[E, float]:
        """0..1 per candidate; a candidate left out scores 0."""
        ...

    def picked(self, key: str, endpoint: E) -> None:
        """The request with ``key`` went to ``endpoint`` (an index built from the router's
        own routing history learns here)."""
        ...


class Weights(NamedTuple):
    """The weights a scored balancer applies; ``key`` is the prefix or session weight."""

    queue: float
    kv_cache: float
    in_flight: float
    key: float
