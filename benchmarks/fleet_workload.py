"""The fleet benchmark's workload and arithmetic: tenants' system prompts, Poisson
arrivals, the fleet's capacity from the serving model's parameters, percentiles.

Everything here is a pure function of its arguments (seeded), so every policy sees the
same prompts and the same arrival times.
"""

from __future__ import annotations

import itertools
import math
import random
import string
from dataclasses import dataclass

from router.fake_engine.serving import ServingParams

#: Words prompts are made of: 2,000 random lower-case words of 3 to 8 letters.
_VOCAB = tuple("".join(random.Random(i).choices(string.ascii_lowercase, k=3 + i % 6))
               for i in range(2000))


@dataclass(frozen=True)
class Workload:
    """Tenants with shared system prompts; each request is a tenant's system prompt plus a
    short user turn of its own, answered with a fixed number of tokens. Lengths are in
    the simulator's tokens (words), each drawn uniformly from its range. Tenants are
    picked uniformly, or with ``skew`` > 0 by Zipf's law (tenant *k* in proportion to
    1 / (k + 1) ** skew)."""

    tenants: int = 100
    system_tokens: tuple[int, int] = (2000, 6000)
    user_tokens: tuple[int, int] = (50, 150)
    output_tokens: tuple[int, int] = (64, 192)
    seed: int = 16
    skew: float = 0.0

    def tenant_weights(self) -> list[float]:
        return [1.0 / (k + 1) ** self.skew for k in range(self.tenants)]

    def system_prompts(self) -> list[str]:
        rng = random.Random(self.seed)
        lo, hi = self.system_tokens
        return [" ".join(rng.choices(_VOCAB, k=rng.randint(lo, hi))) for _ in range(self.tenants)]

    def mean_uncached_tokens(self, block_size: int) -> float:
        """Prompt tokens a request computes when its system prompt is cached: the user turn,
        the assistant tag, and the block that straddles the system prompt's end."""
        return _mean(self.user_tokens) + 1 + (block_size - 1) / 2


@dataclass(frozen=True)
class Arrival:
    at_s: float  # simulated seconds from the start of the load
    tenant: int
    user: str
    max_tokens: int


def arrivals(workload: Workload, rate: float, seconds: float, seed: int) -> list[Arrival]:
    """An open-loop Poisson process at ``rate`` requests per (simulated) second."""
    rng = random.Random(seed)
    tenants = range(workload.tenants)
    weights = list(itertools.accumulate(workload.tenant_weights()))
    out: list[Arrival] = []
    t = rng.expovariate(rate)
    while t < seconds:
        user = " ".join(rng.choices(_VOCAB, k=rng.randint(*workload.user_tokens)))
        tenant = rng.choices(tenants, cum_weights=weights)[0]
        out.append(Arrival(t, tenant, user, rng.randint(*workload.output_tokens)))
        t += rng.expovariate(rate)
    return out


def replica_capacity(params: ServingParams, workload: Workload) -> float:
    """Requests per simulated second one replica completes with every slot busy and every
    system prompt a cache hit: the best any policy can do.

    Each request costs its uncached prompt tokens times the prefill cost, plus its output
    tokens times a decode step's share per sequence at a full batch
    (``step_base_s / max_num_seqs + step_per_seq_s``).
    """
    prefill = workload.mean_uncached_tokens(params.block_size) * params.prefill_s_per_token
    per_token = params.step_base_s / params.max_num_seqs + params.step_per_seq_s
    return 1.0 / (prefill + _mean(workload.output_tokens) * per_token)


def percentile(values: list[tuple[float, bool]], q: float) -> tuple[float, bool]:
    """The ``q`` quantile (nearest rank) of (value, cut) pairs, and whether it is only a
    lower bound. A cut value is a lower bound (the request was still unanswered when the
    run ended), so the quantile of the values as given is a lower bound of the true one,
    and exact unless some cut value lies at or below it."""
    if not values:
        return math.nan, False
    ordered = sorted(v for v, _ in values)
    value = ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
    return value, any(cut and v <= value for v, cut in values)


def _mean(span: tuple[int, int]) -> float:
    return (span[0] + span[1]) / 2
