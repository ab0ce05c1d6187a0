"""One command: start the fast engine and the proxies, load them in interleaved rounds, report.

    python -m benchmarks.run [--quick] [--peer NAME='cmd {port} {upstream}']
                             [--variant NAME='ENV=VAL ...'] [--out report.md]

Every process started here runs in its own process group and is killed on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import TypeVar

from benchmarks import report, stream_client, wrk
from benchmarks.procs import (
    Supervisor,
    cpu_seconds,
    machine_busy_seconds,
    tree_cpu_seconds,
    tree_rss_kb,
)
from benchmarks.results import ChatSample, Results, Rounds, StreamSample
from benchmarks.stack import HOST, Live, log, start_engine, start_targets
from benchmarks.targets import MODEL, ROUTEYARD_CMD, Placement, Target, build, write_routes

T = TypeVar("T")
CHAT_CONNS = (1, 16, 64)
STREAM_CONNS = (1, 16)
SSE_STREAMS = 256


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run",
                                description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="2 rounds of short runs (about 1 minute with the default targets)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 2)")
    p.add_argument("--seconds", type=float, help="each wrk run (default 5, quick 2)")
    p.add_argument("--stream-seconds", type=float,
                   help="each streaming latency run (default 2, quick 1)")
    p.add_argument("--sse-seconds", type=float,
                   help=f"each {SSE_STREAMS}-stream relay run (default 5, quick 2)")
    p.add_argument("--peer", action="append", default=[], metavar="NAME='CMD'",
                   help="another proxy; CMD uses {port} and {upstream} (e.g. "
                        "http://127.0.0.1:PORT of the engine)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME='ENV=VAL ...'",
                   help="routeyard with extra environment, e.g. tracing='ROUTEYARD_TRACING=1'")
    p.add_argument("--no-observability", action="store_true",
                   help="leave out the routeyard[metrics off] and routeyard[tracing on] rows")
    p.add_argument("--no-policies", action="store_true",
                   help="leave out the routeyard[load_aware] and routeyard[cache_aware] rows")
    p.add_argument("--router-cmd", default=ROUTEYARD_CMD,
                   help="routeyard command template ({config} {port} {workers} {upstream})")
    p.add_argument("--scaling-workers", type=int, default=2,
                   help="also run routeyard with this many workers, unpinned (0: skip)")
    p.add_argument("--no-routeyard", action="store_true",
                   help="measure only the engine and the peers")
    p.add_argument("--chunk-delay-ms", type=float, default=1.0,
                   help="engine pause between stream chunks (default 1 ms, like a fast "
                        "decoder; 0: all 20 at once)")
    p.add_argument("--nice", type=int, default=0,
                   help="niceness for the benchmark and everything it starts; on a shared "
                        "machine e.g. -10 (needs root) keeps other work off the measurement")
    p.add_argument("--startup-timeout", type=float, default=30.0)
    p.add_argument("--out", type=Path, help="also write the Markdown report here")
    p.add_argument("--json", type=Path, help="write every per-round figure here")
    p.add_argument("--logs", type=Path, help="keep server logs here (default: a temp dir)")
    args = p.parse_args(argv)
    quick = args.quick
    args.rounds = args.rounds or (2 if quick else 3)
    args.seconds = args.seconds or (2.0 if quick else 5.0)
    args.stream_seconds = args.stream_seconds or (1.0 if quick else 2.0)
    args.sse_seconds = args.sse_seconds or (2.0 if quick else 5.0)
    return args


def attempt(res: Results, lv: Live, what: str, fn: Callable[[], T]) -> T | None:
    """Run one measurement; a failure is recorded and leaves a hole in that round."""
    if lv.proc.popen.poll() is not None:
        res.failures.setdefault(lv.target.name, f"process exited ({lv.proc.popen.returncode})")
        return None
    try:
        return fn()
    except Exception as exc:  # one failed run must not end the benchmark
        res.failures.setdefault(lv.target.name, f"{what}: {exc!r}")
        log(f"{lv.target.name} {what} failed: {exc!r}")
        return None


def chat(lv: Live, script: Path, conns: int, seconds: float, cpus: str | None) -> ChatSample:
    """One wrk run against ``lv``, with the server's CPU time spent meanwhile."""
    url = f"http://{HOST}:{lv.port}/v1/chat/completions"
    cpu0 = tree_cpu_seconds(lv.proc.pid)
    result = wrk.run(url, script, conns, seconds, cpus)
    return ChatSample.of(result, tree_cpu_seconds(lv.proc.pid) - cpu0)


def streams(lv: Live, conns: int, seconds: float) -> StreamSample:
    """``conns`` concurrent streams for ``seconds``, with the server's CPU time."""
    request = stream_client.build_request(HOST, lv.port, stream_client.stream_body(MODEL))
    cpu0 = tree_cpu_seconds(lv.proc.pid)
    stats = stream_client.measure(HOST, lv.port, request, conns, seconds)
    return StreamSample.of(stats, tree_cpu_seconds(lv.proc.pid) - cpu0)


def check_trace_exports(engine: Live, targets: list[Target], res: Results) -> None:
    """A tracing row whose spans never reached the engine's OTLP sink measured nothing
    of the export: that is a problem of the run, not a fast result."""
    tracing = [t.name for t in targets
               if t.env.get("ROUTEYARD_TRACING") == "true" and t.name in res.targets]
    if not tracing:
        return
    with urllib.request.urlopen(f"http://{HOST}:{engine.port}/_stats", timeout=5) as r:
        exports = json.load(r)["trace_exports"]
    log(f"OTLP exports received by the engine's sink: {exports}")
    if exports == 0:
        for name in tracing:
            res.failures[name] = "no span export reached the engine's OTLP sink"


def run_rounds(args: argparse.Namespace, live: list[Live], script: Path, place: Placement,
               res: Results) -> None:
    log("warm-up")
    for lv in live:
        attempt(res, lv, "warm-up", partial(chat, lv, script, 16, 1, place.load))
        attempt(res, lv, "warm-up", partial(streams, lv, 4, 0.5))
    rss_before: dict[str, int] = {}
    for rnd in range(args.rounds):
        order = live[rnd % len(live):] + live[:rnd % len(live)]
        for c in CHAT_CONNS:
            for lv in order:
                log(f"round {rnd + 1}/{args.rounds} chat c={c} {lv.target.name}")
                r = attempt(res, lv, f"chat c={c}",
                            partial(chat, lv, script, c, args.seconds, place.load))
                res.chat.setdefault((lv.target.name, c), []).append(r)
        if rnd == 0:
            rss_before = {lv.target.name: tree_rss_kb(lv.proc.pid) for lv in live
                          if not lv.target.is_direct}
        for c in STREAM_CONNS:
            for lv in order:
                log(f"round {rnd + 1}/{args.rounds} stream c={c} {lv.target.name}")
                s = attempt(res, lv, f"stream c={c}",
                            partial(streams, lv, c, args.stream_seconds))
                res.stream.setdefault((lv.target.name, c), []).append(s)
        for lv in order:
            log(f"round {rnd + 1}/{args.rounds} sse {SSE_STREAMS} streams {lv.target.name}")
            s = attempt(res, lv, "sse", partial(streams, lv, SSE_STREAMS, args.sse_seconds))
            res.sse.setdefault(lv.target.name, []).append(s)
    for lv in live:
        if lv.target.name in rss_before:
            res.rss_kb[lv.target.name] = (rss_before[lv.target.name], tree_rss_kb(lv.proc.pid))


def _dump(res: Results, path: Path) -> None:
    def rounds(d: dict[object, Rounds[object]]) -> dict[str, list[object]]:
        return {str(k): [asdict(v) if v is not None else None for v in vs]  # type: ignore[call-overload]
                for k, vs in d.items()}
    path.write_text(json.dumps({"chat": rounds(res.chat), "stream": rounds(res.stream),  # type: ignore[arg-type]
                                "sse": rounds(res.sse), "rss_kb": res.rss_kb,  # type: ignore[arg-type]
                                "failures": res.failures}, indent=1))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        targets = build(None if args.no_routeyard else args.router_cmd, args.variant,
                        args.peer, args.scaling_workers, not args.no_observability,
                        not args.no_policies)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # inherited by every child
    place = Placement.detect()
    if place.load is not None:
        os.sched_setaffinity(0, {int(place.load)})  # the stream client runs in this process
    log_dir = args.logs or Path(tempfile.mkdtemp(prefix="routeyard-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    res = Results([t.name for t in targets])
    started = time.monotonic()
    busy0, own0 = machine_busy_seconds(), cpu_seconds(os.getpid(), waited_children=True)
    with Supervisor(log_dir) as sup:
        engine = start_engine(sup, targets[0], place, args.chunk_delay_ms,
                              args.startup_timeout)
        routes = {policy: write_routes(log_dir / "config", engine.port, policy)
                  for policy in {t.policy for t in targets}}
        script = wrk.write_script(log_dir / "chat.lua", wrk.chat_body(MODEL))
        live = start_targets(sup, targets, engine, place, routes, args.startup_timeout,
                             res.failures)
        res.targets = [lv.target.name for lv in live]
        run_rounds(args, live, script, place, res)
        check_trace_exports(engine, targets, res)
        # Measured before the servers are stopped: once reaped, their CPU time would be
        # counted again in this process's children's time.
        wall = time.monotonic() - started
        ours = (sup.running_cpu_seconds() + cpu_seconds(os.getpid(), waited_children=True)
                - own0)
        foreign = max(0.0, (machine_busy_seconds() - busy0 - ours) / wall)
    settings = {
        "placement": place.note,
        "rounds": f"{args.rounds}, interleaved (order rotated each round)",
        "run lengths": f"wrk {args.seconds:g} s, stream latency {args.stream_seconds:g} s, "
                       f"SSE relay {args.sse_seconds:g} s",
        "engine": f"benchmarks.fast_engine, chunk delay {args.chunk_delay_ms:g} ms",
        "wall time": f"{wall:.0f} s" + (f", niceness {args.nice}" if args.nice else ""),
        "other load": f"{foreign:.2f} CPUs busy on average with processes not started here"
                      + (" - NOISY, rerun on a quiet machine" if foreign > 0.1 else " (quiet)"),
        "logs": str(log_dir),
    }
    judged = [t.name for t in targets if not t.is_direct and t.judged and t.name in res.targets]
    scored = [t.name for t in targets if t.policy != "round_robin" and t.name in res.targets]
    text = report.render(res, report.machine(), settings, judged, CHAT_CONNS, STREAM_CONNS,
                         SSE_STREAMS, scored)
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        _dump(res, args.json)
    problems = res.problems()
    for problem in problems:
        print(f"benchmark problem: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
