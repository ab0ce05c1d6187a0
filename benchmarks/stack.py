"""Bring up the servers under test: the fast engine, then each proxy, all supervised."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.procs import Proc, Supervisor, free_port, wait_healthy
from benchmarks.targets import Placement, Target

HOST = "127.0.0.1"


@dataclass
class Live:
    """A target that is up: where to send load, and the process to watch."""

    target: Target
    port: int
    proc: Proc


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def start_engine(sup: Supervisor, direct: Target, place: Placement, chunk_delay_ms: float,
                 timeout: float) -> Live:
    """The fast engine, on the load generator's CPU."""
    port = free_port()
    argv = [sys.executable, "-m", "benchmarks.fast_engine", "--host", HOST, "--port", str(port),
            "--chunk-delay-ms", str(chunk_delay_ms)]
    proc = sup.start("fast_engine", argv, cpus=place.load)
    wait_healthy(HOST, port, proc.popen, timeout)
    return Live(direct, port, proc)


def start_targets(sup: Supervisor, targets: list[Target], engine: Live, place: Placement,
                  routes: dict[str, Path], timeout: float,
                  failures: dict[str, str]) -> list[Live]:
    """Start each proxy (on the routes file of its policy) and wait for its ``/health``; one
    that fails is noted and skipped."""
    upstream = f"http://{HOST}:{engine.port}"
    live = [engine]
    for t in targets:
        if t.is_direct:
            continue
        port = free_port()
        cpus = place.proxy if t.pinned else place.all_cpus
        name = t.name.replace(" ", "_").replace("/", "_")
        try:
            proc = sup.start(name, t.argv(port, upstream, routes[t.policy]),
                             t.environment(upstream), cpus)
        except (OSError, ValueError, KeyError, IndexError) as exc:
            failures[t.name] = f"could not start: {exc!r}"
            log(f"{t.name}: could not start: {exc!r}")
            continue
        try:
            wait_healthy(HOST, port, proc.popen, timeout)
        except (RuntimeError, TimeoutError) as exc:
            failures[t.name] = f"{exc}; log tail:\n\n```\n{proc.log_tail()}\n```"
            log(f"{t.name}: {exc}")
            sup.stop(proc)
            continue
        log(f"{t.name} up on :{port} (pid {proc.pid}, cpus {cpus or 'any'})")
        live.append(Live(t, port, proc))
    return live


