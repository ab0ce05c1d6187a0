"""Fleet simulation: simulated vLLM replicas behind routeyard, one router per policy, an
open-loop multi-tenant workload at several loads; per policy, in one run: TTFT and
end-to-end p50/p90, the engines' prefix-cache hit ratio and their output throughput.

    python -m benchmarks.fleet [--quick] [--out report.md] [--policies a,b] [--loads 0.5,0.8]

Each replica is ``python -m router.fake_engine --simulate`` (``router.fake_engine.serving``);
times are reported in simulated seconds (real seconds / ``--time-scale``). A policy the
routes file of this tree refuses is listed as not available and skipped. Every process
started here runs in its own process group and is killed on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.fleet_workload import (
    Arrival,
    Workload,
    arrivals,
    percentile,
    replica_capacity,
)
from benchmarks.procs import (
    Supervisor,
    cpu_seconds,
    free_port,
    machine_busy_seconds,
    wait_healthy,
)
from benchmarks.stack import HOST, log
from benchmarks.stream_client import StreamConnection, build_request
from router.config import ConfigError, parse
from router.fake_engine.serving import ServingParams

POLICIES = ("round_robin", "least_request", "prefix", "load_aware", "cache_aware")
LOADS = (0.5, 0.8, 0.95)
MODEL = "fleet-model"
#: The replicas' settings over the serving model's defaults (an 8B model on one H100):
#: 32 slots, so the streams in flight stay within what two CPU cores relay; 192k tokens of
#: KV cache, less than the tenants' prompts (~400k) so that where a tenant is sent
#: decides whether its prompt is cached; 16 tokens per streamed chunk.
REPLICA_SETTINGS = {"max_num_seqs": 32, "num_blocks": 12_000, "stream_interval": 16}
COUNTERS = ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:generation_tokens")
#: Real seconds the priming requests may take (about 10 with the default workload).
PRIME_TIMEOUT_S = 120.0
#: The goal at 80 % load: cache_aware's P90 TTFT this many times lower than each of these.
GOALS = {"round_robin": 5.0, "prefix": 2.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fleet",
                                description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="one load (80 %%), 30 tenants, short windows: about a minute")
    p.add_argument("--replicas", type=int, default=8)
    p.add_argument("--policies", default=",".join(POLICIES),
                   help=f"comma-separated, in order (default {','.join(POLICIES)})")
    p.add_argument("--loads", help="fractions of the fleet's capacity (default 0.5,0.8,0.95; "
                                   "quick 0.8)")
    p.add_argument("--tenants", type=int, help="default 100 (quick 30)")
    p.add_argument("--warm", type=float, help="simulated seconds of load before the measured "
                                              "window (default 3, quick 1)")
    p.add_argument("--measure", type=float,
                   help="simulated seconds of arrivals measured (default 10, quick 3)")
    p.add_argument("--drain", type=float, help="simulated seconds to wait for answers after "
                                               "the last arrival (default 10, quick 5)")
    p.add_argument("--time-scale", type=float, default=2.0,
                   help="real seconds per simulated second (default 2)")
    p.add_argument("--serving", action="append", default=[], metavar="NAME=VALUE",
                   help="a replica's serving parameter over the benchmark's settings, "
                        "e.g. num_blocks=27000")
    p.add_argument("--skew", type=float, default=0.0,
                   help="tenant popularity: 0 uniform (default), s > 0 Zipf with exponent s")
    p.add_argument("--seed", type=int, default=16)
    p.add_argument("--startup-timeout", type=float, default=60.0)
    p.add_argument("--out", type=Path, help="also write the Markdown report here")
    p.add_argument("--logs", type=Path, help="keep server logs here (default: a temp dir)")
    args = p.parse_args(argv)
    q = args.quick
    args.loads = [float(x) for x in (args.loads or ("0.8" if q else "0.5,0.8,0.95")).split(",")]
    args.tenants = args.tenants or (30 if q else 100)
    args.warm = args.warm if args.warm is not None else (1.0 if q else 3.0)
    args.measure = args.measure or (3.0 if q else 10.0)
    args.drain = args.drain or (5.0 if q else 10.0)
    args.policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    return args


def replica_params(overrides: list[str], time_scale: float) -> ServingParams:
    settings = [f"{k}={v}" for k, v in REPLICA_SETTINGS.items()]
    return ServingParams.parse([*settings, f"time_scale={time_scale}", *overrides])


def engine_argv(port: int, params: ServingParams) -> list[str]:
    argv = [sys.executable, "-m", "router.fake_engine", "--model", MODEL, "--host", HOST,
            "--port", str(port), "--simulate"]
    for name in ServingParams.__dataclass_fields__:
        argv += ["--serving", f"{name}={getattr(params, name)}"]
    return argv


def routes_yaml(policy: str, ports: list[int]) -> str:
    """One model over every replica with ``policy``; timeouts long enough for a queue."""
    backends = "\n".join(f"      - url: http://{HOST}:{port}" for port in ports)
    return (f"models:\n  {MODEL}:\n    policy: {policy}\n    endpoints: [chat]\n"
            f"    timeouts: {{first_byte: 600s, idle: 600s}}\n    backends:\n{backends}\n")


def refusal(policy: str, ports: list[int]) -> str | None:
    """Why this tree's routes file refuses ``policy`` (None: it accepts it)."""
    try:
        parse(routes_yaml(policy, ports).encode(), f"<{policy}>", secrets=False)
    except ConfigError as exc:
        return exc.message.splitlines()[0]
    return None


# engines ------------------------------------------------------------------------------


def scrape(port: int) -> dict[str, float]:
    """The engine's counters and its running + waiting gauges."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def totals(ports: list[int]) -> dict[str, float]:
    sums: dict[str, float] = {}
    for port in ports:
        for name, value in scrape(port).items():
            sums[name] = sums.get(name, 0.0) + value
    return sums


def in_progress(port: int) -> float:
    """Requests the replica has running or waiting."""
    m = scrape(port)
    return m.get("vllm:num_requests_running", 0.0) + m.get("vllm:num_requests_waiting", 0.0)


def wait_idle(ports: list[int], timeout_s: float) -> None:
    """Until no replica has a request running or waiting."""
    deadline = time.monotonic() + timeout_s
    while busy := [p for p in ports if in_progress(p)]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"replicas on ports {busy} still busy after {timeout_s:.0f}s")
        time.sleep(0.1)


def reset_caches(ports: list[int]) -> None:
    for port in ports:
        req = urllib.request.Request(f"http://{HOST}:{port}/reset_prefix_cache", b"",
                                     method="POST")
        with urllib.request.urlopen(req, timeout=5):
            pass


# client -------------------------------------------------------------------------------


@dataclass
class Sample:
    """One request as the client saw it; times in simulated seconds from its send."""

    at_s: float
    measured: bool
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    cut: bool = False  # still unanswered when the run ended: the times are lower bounds
    error: str | None = None


class Client:
    """Streamed chat requests over a pool of keep-alive connections to the router."""

    def __init__(self, port: int, prompts: list[str], scale: float) -> None:
        self.port = port
        self.prompts = [orjson.dumps(p) for p in prompts]  # JSON strings, encoded once
        self.scale = scale
        self.idle: list[StreamConnection] = []

    def request(self, a: Arrival) -> bytes:
        body = (b'{"model":"' + MODEL.encode() + b'","stream":true,"max_tokens":'
                + str(a.max_tokens).encode() + b',"messages":[{"role":"system","content":'
                + self.prompts[a.tenant] + b'},{"role":"user","content":'
                + orjson.dumps(a.user) + b"}]}")
        return build_request(HOST, self.port, body)

    async def send(self, a: Arrival, sample: Sample) -> None:
        loop = asyncio.get_running_loop()
        conn = self.idle.pop() if self.idle else None
        t0 = time.perf_counter()
        try:
            if conn is None or conn.transport is None:
                _, conn = await loop.create_connection(StreamConnection, HOST, self.port)
            await conn.start(self.request(a))
        except asyncio.CancelledError:
            now = time.perf_counter()
            first = conn.t_first if conn is not None and conn.t_first else now
            sample.ttft_s = (first - t0) / self.scale
            sample.e2e_s = (now - t0) / self.scale
            sample.cut = True
            if conn is not None and conn.transport is not None:
                conn.transport.close()  # the router sees the client leave and aborts
            raise
        except Exception as exc:
            sample.error = repr(exc)
            return
        status = conn.parser.get_status_code()
        if status != 200:
            sample.error = f"status {status}"
        sample.ttft_s = (conn.t_first - t0) / self.scale
        sample.e2e_s = (conn.t_end - t0) / self.scale
        if conn.transport is not None:
            self.idle.append(conn)

    def close(self) -> None:
        """Close the idle connections (they belong to the event loop that made them)."""
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()


#: A request the router shed (429: every backend saturated, its queue full or timed out):
#: the policy's answer to an overloaded fleet, reported apart from failures.
SHED = "status 429"


@dataclass
class LoadResult:
    policy: str
    load: float
    samples: list[Sample]
    window_s: float
    counters: dict[str, float] = field(default_factory=dict)

    def measured(self) -> list[Sample]:
        return [s for s in self.samples if s.measured]

    @property
    def hit_ratio(self) -> float:
        queries = self.counters.get("vllm:prefix_cache_queries_total", 0.0)
        return self.counters.get("vllm:prefix_cache_hits_total", 0.0) / queries if queries else 0

    @property
    def tokens_per_s(self) -> float:
        return self.counters.get("vllm:generation_tokens_total", 0.0) / self.window_s

    def quantile(self, what: str, q: float) -> tuple[float, bool]:
        values = [(getattr(s, what), s.cut) for s in self.measured() if s.error is None]
        return percentile(values, q)


async def run_load(client: Client, plan: list[Arrival], warm_s: float, drain_s: float,
                   ports: list[int]) -> tuple[list[Sample], float, dict[str, float]]:
    """Send ``plan`` open-loop; counters and time from the end of the warm-up to the end."""
    loop = asyncio.get_running_loop()
    scale = client.scale
    samples: list[Sample] = []
    tasks: list[asyncio.Task[None]] = []
    before: dict[str, float] | None = None
    t_warm = 0.0
    t0 = loop.time()
    for a in plan:
        if before is None and a.at_s >= warm_s:
            t_warm = loop.time()
            before = await asyncio.to_thread(totals, ports)
        delay = t0 + a.at_s * scale - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        sample = Sample(a.at_s, a.at_s >= warm_s)
        samples.append(sample)
        tasks.append(loop.create_task(client.send(a, sample)))
    if before is None:
        t_warm = loop.time()
        before = await asyncio.to_thread(totals, ports)
    if tasks:
        await asyncio.wait(tasks, timeout=drain_s * scale)
    after = await asyncio.to_thread(totals, ports)
    window = (loop.time() - t_warm) / scale
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    client.close()
    delta = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in after}
    return samples, window, delta


async def prime(client: Client, tenants: int, concurrency: int,
                timeout_s: float) -> list[str]:
    """Each tenant's system prompt once, through the policy, a few at a time; the errors.
    TimeoutError past ``timeout_s`` real seconds."""
    gate = asyncio.Semaphore(concurrency)
    samples = [Sample(0.0, False) for _ in range(tenants)]

    async def one(tenant: int) -> None:
        async with gate:
            await client.send(Arrival(0.0, tenant, "hello", 1), samples[tenant])

    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*(one(t) for t in range(tenants)))
    except TimeoutError:
        raise TimeoutError(f"priming {tenants} tenants took over {timeout_s:.0f}s") from None
    finally:
        client.close()
    return [s.error for s in samples if s.error]


# the run ------------------------------------------------------------------------------


@dataclass
class Run:
    params: ServingParams
    workload: Workload
    capacity: float  # fleet, requests per simulated second
    results: list[LoadResult] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)


def run_policy(sup: Supervisor, policy: str, ports: list[int], run: Run,
               args: argparse.Namespace, log_dir: Path, prompts: list[str]) -> None:
    config_dir = log_dir / f"config-{policy}"
    config_dir.mkdir(parents=True, exist_ok=True)
    config = config_dir / "routes.yaml"
    config.write_text(routes_yaml(policy, ports))
    port = free_port()
    router = sup.start(f"router-{policy}", [sys.executable, "-m", "router.cli", "serve",
                                           "--config", str(config), "--host", HOST,
                                           "--port", str(port), "--workers", "1"])
    try:
        wait_healthy(HOST, port, router.popen, args.startup_timeout)
        wait_idle(ports, 30)
        reset_caches(ports)
        client = Client(port, prompts, args.time_scale)
        errors = uvloop.run(prime(client, args.tenants, len(ports), PRIME_TIMEOUT_S))
        if errors:
            run.failures.append(f"{policy}: {len(errors)} priming requests failed, "
                                f"e.g. {errors[0]}")
        for i, load in enumerate(args.loads):
            rate = load * run.capacity
            plan = arrivals(run.workload, rate, args.warm + args.measure, args.seed + i)
            log(f"{policy}: {load:.0%} load, {rate:.1f} req/s simulated, {len(plan)} requests")
            samples, window, delta = uvloop.run(
                run_load(client, plan, args.warm, args.drain, ports))
            result = LoadResult(policy, load, samples, window, delta)
            run.results.append(result)
            errors = [s.error for s in samples if s.error and s.error != SHED]
            if errors:
                run.failures.append(f"{policy} at {load:.0%}: {len(errors)} requests failed, "
                                    f"e.g. {errors[0]}")
            wait_idle(ports, 60)
    finally:
        sup.stop(router)


def fmt_time(value: tuple[float, bool]) -> str:
    v, cut = value
    return "—" if v != v else f"{'≥ ' if cut else ''}{v:.2f}"


def render(run: Run) -> str:
    lines = ["# Fleet simulation", ""]
    lines += [f"- **{k}**: {v}" for k, v in run.settings.items()]
    for name, why in run.skipped.items():
        lines.append(f"- **{name}**: not available in this tree ({why})")
    for load in sorted({r.load for r in run.results}):
        rate = load * run.capacity
        lines += ["", f"## {load:.0%} of capacity ({rate:.1f} requests/s, simulated)", "",
                  "| policy | TTFT p50 s | TTFT p90 s | end-to-end p50 s | end-to-end p90 s "
                  "| prefix-cache hit ratio | output tokens/s | answered | shed (429) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in run.results if r.load == load):
            measured = r.measured()
            done = sum(1 for s in measured if not s.cut and s.error is None)
            shed = sum(1 for s in measured if s.error == SHED)
            lines.append(
                f"| `{r.policy}` | {fmt_time(r.quantile('ttft_s', 0.5))} "
                f"| {fmt_time(r.quantile('ttft_s', 0.9))} "
                f"| {fmt_time(r.quantile('e2e_s', 0.5))} | {fmt_time(r.quantile('e2e_s', 0.9))} "
                f"| {r.hit_ratio:.1%} | {r.tokens_per_s:,.0f} | {done}/{len(measured)} "
                f"| {shed} |")
    lines += ["", "Times are simulated seconds, from the client's send to the first body byte "
              "(TTFT) and to the end of the stream; ≥: a lower bound, requests were still "
              "unanswered when the run ended. Hit ratio and tokens/s are the replicas' own "
              "counters over the measured window; answered: measured requests finished; shed: "
              "measured requests the router refused with 429 (its queue full or timed out "
              "while every engine was saturated), left out of the percentiles."]
    lines += ["", *goal_lines(run)]
    if run.failures:
        lines += ["", "Problems:", "", *[f"- {f}" for f in run.failures]]
    return "\n".join(lines) + "\n"


def goal_lines(run: Run) -> list[str]:
    at = {r.policy: r for r in run.results if abs(r.load - 0.8) < 1e-9}
    if "cache_aware" not in at:
        return ["Goal at 80 % load (cache_aware P90 TTFT ≥ 5x lower than round_robin, ≥ 2x "
                "lower than prefix): not judged, cache_aware did not run."]
    ours = at["cache_aware"].quantile("ttft_s", 0.9)[0]
    out = []
    for other, factor in GOALS.items():
        if other not in at:
            continue
        theirs, cut = at[other].quantile("ttft_s", 0.9)
        ratio = theirs / ours if ours else float("inf")
        verdict = "PASS" if ratio >= factor else "MISS"
        out.append(f"- cache_aware P90 TTFT {ours:.2f} s vs {other} {'≥ ' if cut else ''}"
                   f"{theirs:.2f} s: {'≥ ' if cut else ''}{ratio:.1f}x lower (goal ≥ "
                   f"{factor:g}x): **{verdict}**")
    return ["Goal at 80 % load:", "", *out]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        params = replica_params(args.serving, args.time_scale)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    unknown = [p for p in args.policies if p not in POLICIES]
    if unknown:
        print(f"error: unknown policies {unknown}; choose from {', '.join(POLICIES)}",
              file=sys.stderr)
        return 2
    if args.skew < 0:
        print(f"error: --skew {args.skew:g}: must be 0 (uniform) or more", file=sys.stderr)
        return 2
    workload = Workload(tenants=args.tenants, seed=args.seed, skew=args.skew)
    capacity = args.replicas * replica_capacity(params, workload)
    run = Run(params, workload, capacity)
    log_dir = args.logs or Path(tempfile.mkdtemp(prefix="routeyard-fleet-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    prompts = workload.system_prompts()
    started = time.monotonic()
    busy0, own0 = machine_busy_seconds(), cpu_seconds(os.getpid(), waited_children=True)
    with Supervisor(log_dir) as sup:
        ports = [free_port() for _ in range(args.replicas)]
        engines = [sup.start(f"replica-{i}", engine_argv(port, params))
                   for i, port in enumerate(ports)]
        for proc, port in zip(engines, ports, strict=True):
            wait_healthy(HOST, port, proc.popen, args.startup_timeout)
        log(f"{len(ports)} replicas up; fleet capacity {capacity:.1f} req/s simulated")
        for policy in args.policies:
            why = refusal(policy, ports)
            if why is not None:
                run.skipped[policy] = why
                log(f"{policy}: not available in this tree ({why})")
                continue
            try:
                run_policy(sup, policy, ports, run, args, log_dir, prompts)
            except (OSError, RuntimeError, TimeoutError, urllib.error.URLError) as exc:
                run.failures.append(f"{policy}: {exc!r}")
                log(f"{policy} failed: {exc!r}")
        # Before the replicas are stopped: once reaped, their CPU time is counted in ours.
        wall = time.monotonic() - started
        own = sup.running_cpu_seconds() + cpu_seconds(os.getpid(), waited_children=True) - own0
        busy = machine_busy_seconds() - busy0
    run.settings = settings(args, params, workload, capacity, wall, own / wall, busy / wall,
                            log_dir)
    text = render(run)
    print(text)
    if args.out:
        args.out.write_text(text)
    for problem in run.failures:
        print(f"benchmark problem: {problem}", file=sys.stderr)
    return 1 if run.failures else 0


def settings(args: argparse.Namespace, params: ServingParams, workload: Workload,
             capacity: float, wall: float, own: float, busy: float,
             log_dir: Path) -> dict[str, str]:
    replica = capacity / args.replicas
    return {
        "replicas": f"{args.replicas} x `python -m router.fake_engine --simulate`, one "
                    f"routeyard worker per policy",
        "serving model": json.dumps({k: getattr(params, k)
                                     for k in ServingParams.__dataclass_fields__}),
        "workload": f"{workload.tenants} tenants, system prompts of {workload.system_tokens[0]}"
                    f"-{workload.system_tokens[1]} tokens, user turns of "
                    f"{workload.user_tokens[0]}-{workload.user_tokens[1]}, outputs of "
                    f"{workload.output_tokens[0]}-{workload.output_tokens[1]} tokens "
                    f"(uniform), streamed; Poisson arrivals, tenants "
                    + (f"by Zipf's law, exponent {workload.skew:g}" if workload.skew
                       else "uniform"),
        "capacity": f"{replica:.1f} requests/s per replica, {capacity:.1f} for the fleet "
                    "(simulated): every slot busy, every system prompt a hit "
                    "(`benchmarks/fleet_workload.replica_capacity`)",
        "phases per policy": f"caches reset, each tenant once (prime), then per load "
                             f"{args.warm:g} s warm-up + {args.measure:g} s measured arrivals, "
                             f"up to {args.drain:g} s to drain (simulated)",
        "time scale": f"{args.time_scale:g} real seconds per simulated second",
        "wall time": f"{wall:.0f} s; this run's processes used {own:.2f} CPUs on average, "
                     f"the machine's were {busy:.2f} busy (everything, this run included)",
        "logs": str(log_dir),
    }


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
