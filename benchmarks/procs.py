"""Start servers in their own process groups, wait for ``/health``, and always kill them.

``Supervisor`` is a context manager: every process it started is stopped on exit, on
SIGTERM and at interpreter exit, by process group (SIGTERM, then SIGKILL after a grace).
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(host: str, port: int, proc: subprocess.Popen[bytes], timeout_s: float,
                 path: str = "/health") -> None:
    """Poll ``GET path`` until it answers 200; fail early if the process exits."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {path} was ready")
        conn = http.client.HTTPConnection(host, port, timeout=1.0)
        try:
            conn.request("GET", path)
            status = conn.getresponse().status
            if status == 200:
                return
            last = f"status {status}"
        except OSError as exc:
            last = repr(exc)
        finally:
            conn.close()
        time.sleep(0.1)
    raise TimeoutError(f"http://{host}:{port}{path} not ready after {timeout_s:.0f}s ({last})")


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                kids += [int(k) for k in Path(f"/proc/{pid}/task/{task}/children")
                         .read_text().split()]
    return kids


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants (Sanic runs workers as child processes)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def rss_kb(pid: int) -> int:
    """VmRSS of one process in KiB (0 if it is gone)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def tree_rss_kb(pid: int) -> int:
    """Sum of VmRSS over ``pid`` and its descendants, in KiB."""
    return sum(rss_kb(p) for p in tree_pids(pid))


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, waited_children: bool = False) -> float:
    """User + system CPU of one process (plus its reaped children's, if asked)."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        # fields[0] is state (field 3), so utime (field 14) is fields[11].
        ticks = int(fields[11]) + int(fields[12])
        if waited_children:
            ticks += int(fields[13]) + int(fields[14])
        return ticks / _TICK
    return 0.0


def tree_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(p, waited_children=True) for p in tree_pids(pid))


def machine_busy_seconds() -> float:
    """CPU time spent not idle, summed over all CPUs, since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / _TICK


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


class Supervisor:
    """Owns every process the benchmark starts."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[Proc] = []
        self._old_term: object = None

    def __enter__(self) -> Supervisor:
        atexit.register(self.stop_all)
        self._old_term = signal.signal(signal.SIGTERM, self._on_term)
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop_all()
        signal.signal(signal.SIGTERM, self._old_term)  # type: ignore[arg-type]
        atexit.unregister(self.stop_all)

    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
              cpus: str | None = None) -> Proc:
        """Start ``argv`` in a new session (its own process group), optionally pinned."""
        full_env = {**os.environ, **(env or {})}
        if cpus is not None:
            argv = ["taskset", "-c", cpus, *argv]
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as fh:
            popen = subprocess.Popen(list(argv), stdout=fh, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=full_env,
                                     start_new_session=True)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, grace_s: float = 5.0) -> None:
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(grace_s)
        # The leader may be gone while workers in its group live on: always sweep.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(2.0)
        if proc in self.procs:
            self.procs.remove(proc)

    def running_cpu_seconds(self) -> float:
        """CPU time of every process tree still running (stopped ones are reaped into ours)."""
        return sum(tree_cpu_seconds(p.pid) for p in self.procs if p.popen.poll() is None)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)
