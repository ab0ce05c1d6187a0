"""Render :class:`~benchmarks.results.Results` as a Markdown report, goals with PASS/MISS."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path

from benchmarks.results import (
    Results,
    diff,
    median_of,
    paired,
    ratio,
    spread,
)

DIRECT = "direct"


# The figure of one sample (ChatSample or StreamSample) that a column shows.
_rps = attrgetter("rps")
_p50 = attrgetter("p50_ms")
_p99 = attrgetter("p99_ms")
_err = _serr = attrgetter("errors")
_cpu = attrgetter("cpu_us")
_ttfb = attrgetter("ttfb_p50")
_total = attrgetter("total_p50")
_ttfb99 = attrgetter("ttfb_p99")
_eps = attrgetter("events_per_s")


@dataclass(frozen=True)
class Goal:
    """One target from the issue, measured per judged proxy."""

    label: str
    limit: float
    at_least: bool
    unit: str
    measure: Callable[[Results, str], float]

    def verdict(self, value: float) -> str:
        if math.isnan(value):
            return "n/a"
        ok = value >= self.limit if self.at_least else value <= self.limit
        return "PASS" if ok else "MISS"


GOALS = (
    Goal("added p50, non-streaming, 1 connection", 0.2, False, "ms",
         lambda r, t: paired(r.chat.get((t, 1), []), r.chat.get((DIRECT, 1), []), _p50, diff)),
    Goal("req/s, non-streaming, 64 connections, one core", 6000, True, "req/s",
         lambda r, t: median_of(r.chat.get((t, 64), []), _rps)),
    Goal("req/s per core from CPU time (1e6 / CPU µs per req), 64 connections", 6000, True,
         "req/s", lambda r, t: 1e6 / median_of(r.chat.get((t, 64), []), _cpu)),
    Goal("added TTFB, streaming, 1 connection", 1.0, False, "ms",
         lambda r, t: paired(r.stream.get((t, 1), []), r.stream.get((DIRECT, 1), []),
                             _ttfb, diff)),
)


def machine() -> dict[str, str]:
    """nproc, CPU model, Python, kernel and wrk version of this machine."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True,
                             timeout=5, check=False).stdout.split("[")[0].strip()
    except OSError:
        wrk = "not found"
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "wrk": wrk,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def _f(value: float, digits: int = 3) -> str:
    if math.isnan(value):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0f}%"


def _signed(value: float, digits: int = 3) -> str:
    return "-" if math.isnan(value) else f"{value:+.{digits}f}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(r) + " |" for r in rows)]


def _goals(res: Results, judged: list[str]) -> list[str]:
    rows = []
    for goal in GOALS:
        sign = "≥" if goal.at_least else "≤"
        for t in judged:
            v = goal.measure(res, t)
            rows.append([goal.label, f"{sign} {goal.limit:g} {goal.unit}", t,
                         _f(v), goal.verdict(v)])
    out = _table(["goal", "limit", "target", "measured", "PASS/MISS"], rows)
    if not judged:
        out += ["", "No proxy pinned to one core ran, so no goal could be judged."]
    return out


def _chat(res: Results, conns: tuple[int, ...]) -> list[str]:
    rows = []
    for c in conns:
        base = res.chat.get((DIRECT, c), [])
        for t in res.targets:
            r = res.chat.get((t, c), [])
            if r:
                rows.append([t, str(c), _f(median_of(r, _rps), 0), _pct(spread(r, _rps)),
                             _f(median_of(r, _p50)), _f(median_of(r, _p99)),
                             _f(paired(r, base, _rps, ratio), 2),
                             _signed(paired(r, base, _p50, diff)), _f(median_of(r, _cpu), 1),
                             _f(median_of(r, _err), 0)])
    return _table(["target", "conns", "req/s", "spread", "p50 ms", "p99 ms", "x direct req/s",
                   "added p50 ms", "CPU µs/req", "errors"], rows)


def _stream(res: Results, conns: tuple[int, ...]) -> list[str]:
    rows = []
    for c in conns:
        base = res.stream.get((DIRECT, c), [])
        for t in res.targets:
            r = res.stream.get((t, c), [])
            if r:
                rows.append([t, str(c), _f(median_of(r, _ttfb)), _f(median_of(r, _total)),
                             _signed(paired(r, base, _ttfb, diff)),
                             _signed(paired(r, base, _total, diff)),
                             _f(median_of(r, _ttfb99)), _f(median_of(r, _serr), 0)])
    return _table(["target", "conns", "TTFB p50 ms", "total p50 ms", "added TTFB ms",
                   "added total ms", "TTFB p99 ms", "errors"], rows)


def _sse(res: Results) -> list[str]:
    base = res.sse.get(DIRECT, [])
    rows = [[t, _f(median_of(r, _eps), 0), _pct(spread(r, _eps)),
             _f(paired(r, base, _eps, ratio), 2), _f(median_of(r, _cpu), 1),
             _f(median_of(r, _serr), 0)]
            for t in res.targets if (r := res.sse.get(t))]
    return _table(["target", "chunks/s", "spread", "x direct", "CPU µs/chunk", "errors"], rows)


#: The issue's limit on the CPU ``load_aware`` adds per request, against round robin.
SCORED_LIMIT_US = {"routeyard[load_aware]": 15.0}
BASE = "routeyard"


def _scored(res: Results, scored: list[str], conns: tuple[int, ...]) -> list[str]:
    """Per scored row and connection count: CPU per request, and what it adds over the
    plain routeyard row (round robin) in the same rounds."""
    rows = []
    for t in scored:
        for c in conns:
            r, base = res.chat.get((t, c), []), res.chat.get((BASE, c), [])
            if not r:
                continue
            added = paired(r, base, _cpu, diff)
            limit = SCORED_LIMIT_US.get(t)
            verdict = "" if limit is None else (
                "n/a" if math.isnan(added) else "PASS" if added <= limit else "MISS")
            rows.append([t, str(c), _f(median_of(r, _cpu), 1), _signed(added, 1),
                         f"≤ {limit:g}" if limit is not None else "-", verdict or "-"])
    return _table(["target", "conns", "CPU µs/req", "added µs/req vs routeyard", "limit",
                   "PASS/MISS"], rows)


def _memory(res: Results) -> list[str]:
    rows = [[t, f"{a / 1024:.1f}", f"{b / 1024:.1f}", f"{(b - a) / 1024:+.1f}"]
            for t, (a, b) in res.rss_kb.items()]
    return _table(["target", "before MiB", "after MiB", "change MiB"], rows)


def render(res: Results, info: dict[str, str], settings: dict[str, str],
           judged: list[str], chat_conns: tuple[int, ...], stream_conns: tuple[int, ...],
           sse_streams: int, scored: list[str] | None = None) -> str:
    """The whole report: machine and settings, goals, one table per scenario, the scored
    policies' cost, memory."""
    out = ["# routeyard benchmark", ""]
    out += [f"- **{k}**: {v}" for k, v in {**info, **settings}.items()]
    out += ["", "Every figure is the median over rounds; *added* and *x direct* are medians of "
            "per-round differences/ratios against the engine measured directly in the same round; "
            "*spread* is (max - min) / median over rounds; *CPU µs* is the server's own CPU time "
            "(its whole process tree) per request or chunk, which other load barely moves."]
    out += ["", "## Goals", "", *_goals(res, judged)]
    out += ["", "## Non-streaming chat (1 KB request, ~470 B response)", "",
            *_chat(res, chat_conns)]
    out += ["", "## Streaming chat (20 chunks + [DONE])", "", *_stream(res, stream_conns)]
    out += ["", f"## SSE relay, {sse_streams} concurrent streams", "", *_sse(res)]
    if scored:
        out += ["", "## Scored policies: CPU per request against round robin "
                "(non-streaming chat)", "", *_scored(res, scored, chat_conns)]
    out += ["", "## Memory (VmRSS of the server's process tree, before → after streaming)", "",
            *_memory(res)]
    if res.failures:
        out += ["", "## Failures", ""]
        out += [f"- **{t}**: {msg}" for t, msg in res.failures.items()]
    return "\n".join(out) + "\n"
