"""Memory soak: keep streams going through routeyard and sample its RSS; is it flat?

    python -m benchmarks.soak [--minutes 10] [--streams 32] [--interval 10] [--out soak.md]

The first ``--warmup`` share of the run is excluded (pools, caches and allocator arenas
fill up there). After it, the RSS of the router's process tree must not grow by more than
``max(2 MiB, 2 %)`` for the verdict FLAT; otherwise GROWING, with the growth per 1,000
streams so a leak can be sized. Bounded: at most 60 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import uvloop

from benchmarks import report, stream_client
from benchmarks.procs import Supervisor, tree_rss_kb
from benchmarks.stack import HOST, Live, log, start_engine, start_targets
from benchmarks.targets import MODEL, ROUTEYARD_CMD, Placement, Target, write_routes

MAX_MINUTES = 60.0


@dataclass(frozen=True, slots=True)
class Sample:
    t_s: float
    rss_kb: int
    streams: int
    errors: int


@dataclass(frozen=True)
class Verdict:
    baseline_kb: int
    final_kb: int
    growth_kb: int
    per_1000_streams_kb: float
    slope_kb_per_min: float
    flat: bool


def judge(samples: list[Sample], warmup: float) -> Verdict:
    """Compare the end of the run with the RSS just after warm-up."""
    if len(samples) < 3:
        raise ValueError(f"need at least 3 samples to judge, got {len(samples)}; "
                         "run longer or lower --interval")
    cut = samples[-1].t_s * warmup
    steady = [s for s in samples if s.t_s >= cut] or samples[-3:]
    base = steady[0]
    final_kb = int(statistics.median(s.rss_kb for s in samples[-3:]))
    growth = final_kb - base.rss_kb
    streams = samples[-1].streams - base.streams
    slope = 0.0
    if len(steady) >= 2:
        slope = statistics.linear_regression([s.t_s / 60 for s in steady],
                                             [float(s.rss_kb) for s in steady]).slope
    flat = growth <= max(2048, base.rss_kb * 0.02)
    return Verdict(base.rss_kb, final_kb, growth,
                   growth / streams * 1000 if streams else 0.0, slope, flat)


async def soak(live: Live, streams: int, minutes: float, interval_s: float) -> list[Sample]:
    """Run the streams and sample RSS every ``interval_s`` until ``minutes`` are up."""
    stats = stream_client.StreamStats(record=False)
    request = stream_client.build_request(HOST, live.port, stream_client.stream_body(MODEL))
    seconds = minutes * 60
    start = time.perf_counter()
    load = asyncio.create_task(stream_client.run_streams(
        HOST, live.port, request, streams, seconds, stats=stats))
    samples: list[Sample] = []
    while not load.done():
        now = time.perf_counter() - start
        samples.append(Sample(now, tree_rss_kb(live.proc.pid), stats.streams, stats.errors))
        log(f"t={now:5.0f}s rss={samples[-1].rss_kb / 1024:.1f} MiB "
            f"streams={stats.streams} errors={stats.errors}")
        if live.proc.popen.poll() is not None:
            load.cancel()
            raise RuntimeError(f"router exited with {live.proc.popen.returncode}")
        left = seconds - now
        await asyncio.wait({load}, timeout=min(interval_s, left) if left > 0 else None)
    await load
    samples.append(Sample(time.perf_counter() - start, tree_rss_kb(live.proc.pid),
                          stats.streams, stats.errors))
    return samples


def render(samples: list[Sample], v: Verdict, settings: dict[str, str]) -> str:
    info = {**report.machine(), **settings}
    out = ["# routeyard memory soak", "", *(f"- **{k}**: {val}" for k, val in info.items()), ""]
    out += [f"**{'FLAT' if v.flat else 'GROWING'}**: RSS after warm-up "
            f"{v.baseline_kb / 1024:.1f} MiB, at the end {v.final_kb / 1024:.1f} MiB "
            f"({v.growth_kb / 1024:+.2f} MiB, {v.per_1000_streams_kb:+.2f} KiB per 1,000 "
            f"streams, trend {v.slope_kb_per_min:+.1f} KiB/min).", ""]
    out += ["| t (s) | RSS (MiB) | streams | errors |", "|---|---|---|---|"]
    out += [f"| {s.t_s:.0f} | {s.rss_kb / 1024:.1f} | {s.streams:,} | {s.errors} |"
            for s in samples]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak",
                                description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--streams", type=int, default=32, help="concurrent streams")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--warmup", type=float, default=0.2,
                   help="share of the run left out of the verdict (default 0.2)")
    p.add_argument("--chunk-delay-ms", type=float, default=1.0)
    p.add_argument("--router-cmd", default=ROUTEYARD_CMD,
                   help="command template ({config} {port} {workers} {upstream})")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if not 0 < args.minutes <= MAX_MINUTES:
        p.error(f"--minutes must be in (0, {MAX_MINUTES:g}], got {args.minutes}")
    place = Placement.detect()
    if place.load is not None:
        os.sched_setaffinity(0, {int(place.load)})
    log_dir = Path(tempfile.mkdtemp(prefix="routeyard-soak-"))
    target = Target("routeyard", args.router_cmd, workers=args.workers,
                    pinned=args.workers == 1)
    failures: dict[str, str] = {}
    with Supervisor(log_dir) as sup:
        engine = start_engine(sup, Target("direct"), place, args.chunk_delay_ms, 30.0)
        routes = write_routes(log_dir / "config", engine.port)
        live = start_targets(sup, [target], engine, place, routes, 30.0, failures)
        if len(live) < 2:
            print(f"error: routeyard did not start: {failures.get('routeyard')}",
                  file=sys.stderr)
            return 1
        samples = uvloop.run(soak(live[1], args.streams, args.minutes, args.interval))
    verdict = judge(samples, args.warmup)
    text = render(samples, verdict, {
        "load": f"{args.streams} concurrent streams of 20 chunks, "
                f"{args.chunk_delay_ms:g} ms apart, for {args.minutes:g} min",
        "placement": place.note, "logs": str(log_dir)})
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0 if verdict.flat else 3


if __name__ == "__main__":
    sys.exit(main())
