"""Raw per-round measurements and the medians the report is made of.

Rounds are interleaved (direct, routeyard, peer, direct, …), so each "added" figure is the
median over rounds of (target - direct) in the same round, which cancels slow drift.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from benchmarks.stream_client import StreamStats
from benchmarks.wrk import WrkResult

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ChatSample:
    """One wrk run plus the server's CPU time per request (µs), which noise barely moves."""

    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    cpu_us: float

    @classmethod
    def of(cls, w: WrkResult, cpu_s: float) -> ChatSample:
        per = cpu_s / w.requests * 1e6 if w.requests else float("nan")
        return cls(w.rps, w.p50_ms, w.p99_ms, w.requests, w.errors, per)


@dataclass(frozen=True, slots=True)
class StreamSample:
    """One streaming run summarised. Times are milliseconds; CPU is µs per SSE event."""

    ttfb_p50: float
    ttfb_p99: float
    total_p50: float
    total_p99: float
    streams: int
    errors: int
    events_per_s: float
    cpu_us: float

    @classmethod
    def of(cls, s: StreamStats, cpu_s: float) -> StreamSample:
        per = cpu_s / s.events * 1e6 if s.events else float("nan")
        return cls(s.p(s.ttfb_ms, 0.5), s.p(s.ttfb_ms, 0.99), s.p(s.total_ms, 0.5),
                   s.p(s.total_ms, 0.99), s.streams, s.errors, s.events_per_s, per)


Rounds = list[T | None]  # one slot per round; None when that run failed


@dataclass
class Results:
    """Everything measured, keyed by target name, then scenario."""

    targets: list[str]
    chat: dict[tuple[str, int], Rounds[ChatSample]] = field(default_factory=dict)
    stream: dict[tuple[str, int], Rounds[StreamSample]] = field(default_factory=dict)
    sse: dict[str, Rounds[StreamSample]] = field(default_factory=dict)
    rss_kb: dict[str, tuple[int, int]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)

    def problems(self) -> list[str]:
        """What went wrong: targets that failed, runs that did not complete, requests or
        streams that errored. Empty for a clean run (a MISS of a goal is not a problem)."""
        out = [f"{name}: {why.splitlines()[0]}" for name, why in self.failures.items()]
        scenarios: list[tuple[str, Rounds[ChatSample] | Rounds[StreamSample]]] = [
            *((f"{t} chat c={c}", r) for (t, c), r in self.chat.items()),
            *((f"{t} stream c={c}", r) for (t, c), r in self.stream.items()),
            *((f"{t} SSE relay", r) for t, r in self.sse.items()),
        ]
        for label, rounds in scenarios:
            missing = sum(1 for r in rounds if r is None)
            errors = sum(r.errors for r in rounds if r is not None)
            if missing:
                out.append(f"{label}: {missing} run(s) failed")
            if errors:
                out.append(f"{label}: {errors} errors")
        return out


def median_of(rounds: Rounds[T], get: Callable[[T], float]) -> float:
    values = [get(r) for r in rounds if r is not None]
    return statistics.median(values) if values else float("nan")


def spread(rounds: Rounds[T], get: Callable[[T], float]) -> float:
    """(max - min) / median over rounds, in percent: how far to trust the median."""
    values = [get(r) for r in rounds if r is not None]
    if len(values) < 2 or not statistics.median(values):
        return float("nan")
    return (max(values) - min(values)) / statistics.median(values) * 100.0


def paired(rounds: Rounds[T], base: Rounds[T], get: Callable[[T], float],
           op: Callable[[float, float], float]) -> float:
    """Median over rounds of ``op(target, direct)`` for rounds where both ran."""
    values = [op(get(a), get(b)) for a, b in zip(rounds, base, strict=False)
              if a is not None and b is not None]
    return statistics.median(values) if values else float("nan")


def diff(a: float, b: float) -> float:
    return a - b


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")
