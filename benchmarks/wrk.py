"""Drive ``wrk`` (a C load generator, so the client is never the bottleneck) and parse it.

A Lua script sets the POST body; ``--latency`` prints the percentiles read here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_PCT_RE = re.compile(r"^\s*(50|75|90|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_RPS_RE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_TOTAL_RE = re.compile(r"^\s*(\d+) requests in", re.M)
_NON2XX_RE = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCK_RE = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


@dataclass(frozen=True, slots=True)
class WrkResult:
    """One wrk run: throughput, latency percentiles (ms) and anything that went wrong."""

    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int


def chat_body(model: str, size: int = 1024) -> bytes:
    """A non-streaming chat request of about ``size`` bytes of JSON."""
    user = {"role": "user", "content": ""}
    base = {
        "model": model,
        "messages": [{"role": "system", "content": "You are a helpful assistant."}, user],
        "max_tokens": 20,
        "temperature": 0.0,
    }
    filler = "Summarise the following text in one sentence please. "
    pad = size - len(json.dumps(base, separators=(",", ":")))
    user["content"] = (filler * (pad // len(filler) + 1))[: max(pad, 0)]
    return json.dumps(base, separators=(",", ":")).encode()


def write_script(path: Path, body: bytes) -> Path:
    """Write the Lua script that makes wrk POST ``body`` as JSON."""
    text = body.decode()
    if "]==]" in text:
        raise ValueError("request body must not contain ']==]' (it ends the Lua string)")
    path.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = [==[{text}]==]\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    return path


def parse(output: str) -> WrkResult:
    """Read wrk's ``--latency`` report; raise ``ValueError`` naming what is missing."""
    pct = {m.group(1): float(m.group(2)) * _UNITS_MS[m.group(3)] for m in _PCT_RE.finditer(output)}
    rps = _RPS_RE.search(output)
    total = _TOTAL_RE.search(output)
    if rps is None or total is None or "50" not in pct or "99" not in pct:
        raise ValueError(f"unexpected wrk output (was --latency given?):\n{output}")
    errors = 0
    if (m := _NON2XX_RE.search(output)) is not None:
        errors += int(m.group(1))
    if (m := _SOCK_RE.search(output)) is not None:
        errors += sum(int(g) for g in m.groups())
    return WrkResult(float(rps.group(1)), pct["50"], pct["99"], int(total.group(1)), errors)


def run(url: str, script: Path, connections: int, duration_s: float,
        cpus: str | None = None) -> WrkResult:
    """Run one wrk thread against ``url``; pinned to ``cpus`` (taskset list) if given."""
    exe = shutil.which("wrk")
    if exe is None:
        raise RuntimeError("wrk not found on PATH; install it (apt-get install wrk)")
    argv = [exe, "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
            "--timeout", "5s", "--latency", "-s", str(script), url]
    if cpus is not None:
        argv = ["taskset", "-c", cpus, *argv]
    proc = subprocess.run(argv, capture_output=True, text=True,
                          timeout=duration_s + 30, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited {proc.returncode}: {proc.stderr.strip()}")
    return parse(proc.stdout)
