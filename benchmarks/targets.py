"""What gets measured: the engine itself, routeyard (and its variants), and peers.

A target is a server the load goes to. Proxies are started from a command template with
``{port}``, ``{upstream}``, ``{config}`` and ``{workers}`` placeholders.

CPU placement on a 2-core machine: the proxy under test gets core 0 alone; the fake engine
and the load generator share core 1. The engine answers in a few microseconds, so what the
load generator sees on top of the direct run is the proxy's cost on its own core. The
``--workers 2`` row is left unpinned (both cores, shared with engine and load) to show
scaling, not a clean per-core number.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

MODEL = "bench-model"
#: Rows every run has next to the plain routeyard row, so the cost of metrics (on by
#: default) and of tracing (off by default) is always in the report. Tracing exports real
#: OTLP/HTTP to the fast engine's ``/v1/traces`` sink; spans are sampled at 100 %.
OBSERVABILITY_VARIANTS = (
    "metrics off=ROUTEYARD_METRICS=false",
    "tracing on=ROUTEYARD_TRACING=true OTEL_TRACES_EXPORTER=otlp "
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf "
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT={upstream}/v1/traces",
)
ROUTEYARD_CMD = ("routeyard serve --config {config} --host 127.0.0.1 --port {port} "
                 "--workers {workers}")
#: Rows every run has for the policies that route on the engines' ``/metrics``: their
#: added CPU per request is read against the plain (round robin) row of the same run.
SCORED_POLICIES = ("load_aware", "cache_aware")


@dataclass(frozen=True)
class Placement:
    """Which CPUs (taskset lists) the proxy, the engine and the load generator use."""

    proxy: str | None
    load: str | None
    all_cpus: str | None
    note: str

    @classmethod
    def detect(cls) -> Placement:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return cls(None, None, None, "fewer than 2 CPUs: nothing pinned")
        every = ",".join(str(c) for c in cpus)
        return cls(str(cpus[0]), str(cpus[1]), every,
                   f"proxy on CPU {cpus[0]} (taskset); fake engine, wrk and the stream "
                   f"client on CPU {cpus[1]}; `--workers 2` rows unpinned (CPUs {every})")


@dataclass(frozen=True)
class Target:
    """One server under load. ``command`` is empty for the engine measured directly."""

    name: str
    command: str = ""
    env: dict[str, str] = field(default_factory=dict)
    workers: int = 1
    pinned: bool = True
    judged: bool = True  # compared against the targets (one core, one worker)
    #: The routes file's balancing policy (each policy gets a routes file of its own).
    policy: str = "round_robin"

    def environment(self, upstream: str) -> dict[str, str]:
        """``env`` with ``{upstream}`` (the engine's URL) filled in."""
        return {k: v.replace("{upstream}", upstream) for k, v in self.env.items()}

    @property
    def is_direct(self) -> bool:
        return not self.command

    def argv(self, port: int, upstream: str, config: Path) -> list[str]:
        text = self.command.format(port=port, upstream=upstream, config=config,
                                   workers=self.workers)
        return shlex.split(text)


def parse_assignment(text: str, flag: str) -> tuple[str, str]:
    """``NAME=VALUE`` from a command-line flag, with a message that says how to fix it."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"{flag} expects NAME=VALUE, got {text!r}; "
                         f"e.g. {flag} tracing='ROUTEYARD_TRACING=1'")
    return name.strip(), value


def parse_env(text: str, flag: str) -> dict[str, str]:
    """``'A=1 B=two'`` → ``{"A": "1", "B": "two"}``."""
    env: dict[str, str] = {}
    for word in shlex.split(text):
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag}: {word!r} is not ENV=VALUE")
        env[key] = value
    return env


def build(router_cmd: str | None, variants: list[str], peers: list[str],
          scaling_workers: int, observability: bool = True,
          policies: bool = True) -> list[Target]:
    """Direct first, then routeyard, the metrics and tracing rows (``observability``), the
    scored policies' rows (``policies``), the ``--variant`` rows, the scaling row, then
    peers.

    ``router_cmd`` None leaves routeyard out (engine and peers only). Only the plain
    routeyard row and ``--variant`` rows are judged against the goals.
    """
    targets = [Target("direct")]
    if router_cmd:
        targets.append(Target("routeyard", router_cmd))
        for spec in OBSERVABILITY_VARIANTS if observability else ():
            name, env_text = parse_assignment(spec, "--variant")
            targets.append(Target(f"routeyard[{name}]", router_cmd, judged=False,
                                  env=parse_env(env_text, "--variant")))
        for policy in SCORED_POLICIES if policies else ():
            targets.append(Target(f"routeyard[{policy}]", router_cmd, judged=False,
                                  policy=policy))
        for spec in variants:
            name, env_text = parse_assignment(spec, "--variant")
            targets.append(Target(f"routeyard[{name}]", router_cmd,
                                  env=parse_env(env_text, "--variant")))
        if scaling_workers > 1:
            targets.append(Target(f"routeyard --workers {scaling_workers}", router_cmd,
                                  workers=scaling_workers, pinned=False, judged=False))
    for spec in peers:
        name, command = parse_assignment(spec, "--peer")
        if "{port}" not in command:
            raise ValueError(f"--peer {name}: the command must contain {{port}}, got "
                             f"{command!r}")
        targets.append(Target(name, command))
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise ValueError(f"target names must be unique, got {names}")
    return targets


def write_routes(directory: Path, engine_port: int, policy: str = "round_robin") -> Path:
    """The routeyard config: one model, one backend, chat and completions enabled, with
    ``policy`` (a scored one reads the engine's ``/metrics`` at its default interval).

    It gets a directory of its own: routeyard watches the config's directory for hot
    reload, and server logs written next to it would trigger a reload on every write.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ("routes.yaml" if policy == "round_robin" else f"routes-{policy}.yaml")
    path.write_text(
        "models:\n"
        f"  {MODEL}:\n"
        f"    policy: {policy}\n"
        "    backends:\n"
        f"      - url: http://127.0.0.1:{engine_port}\n"
        "    endpoints: [chat, completions]\n"
    )
    return path
