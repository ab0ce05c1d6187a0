"""The one way tests run servers: routers, fake engines, batch servers and workers, moto,
redis-server, the benchmark's engine.

A ``Process`` is one command in its own session (so a stop reaches every worker it forks),
started in the repository root with an environment overlay, its output appended to a log
file. ``start`` returns once a positive readiness signal is seen: an HTTP URL answers 200
(``http_ok``), a line appears in the log (``log_line``), or any check a caller writes; a
process that exits first, or is not ready in time, fails at once with the tail of its log.
``stop`` is SIGTERM with a bounded wait, then SIGKILL; ``kill`` is SIGKILL; both reach the
whole process group. ``signal`` reaches the leader only, as ``kill -SIG PID`` would (a
router's manager process forwards SIGHUP to its workers itself).

``Router`` is a ``routeyard serve`` process with an HTTP client and the admin helpers;
``FakeEngine`` a ``routeyard fake-engine`` process with its introspection endpoints.
``wait_until`` (and ``eventually``, its coroutine twin) is the one polling loop: a test
waits for something to happen, never for a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import os
import random
import re
import signal as signals
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
#: How often ``wait_until`` and the readiness checks poll.
POLL = 0.02


def free_port() -> int:
    """A port nothing listens on now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports_in_a_row(count: int) -> int:
    """The first of ``count`` consecutive ports nothing listens on now, below Linux's
    ephemeral range (so no client connection takes one before it is bound)."""
    for first in random.sample(range(20_000, 32_000, count + 1), 200):
        try:
            with contextlib.ExitStack() as held:
                for port in range(first, first + count):
                    s = held.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise RuntimeError(f"no {count} free ports in a row")


def wait_until(check: Callable[[], Any], timeout: float, what: str,
               interval: float = POLL) -> Any:
    """Poll ``check`` until it returns something truthy, and return that; fail after
    ``timeout`` seconds naming ``what`` and the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what} (last: {value!r})")
        time.sleep(interval)


async def eventually(check: Callable[[], Any], timeout: float, what: str,
                     interval: float = POLL) -> Any:
    """``wait_until`` on the event loop: ``check`` may be a function or a coroutine
    function; the loop keeps running between polls."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what} (last: {value!r})")
        await asyncio.sleep(interval)


def sha256(text: str) -> str:
    """The hash ``/admin/config`` reports for a routes file with this text."""
    return hashlib.sha256(text.encode()).hexdigest()


# -- commands -------------------------------------------------------------------------------

def python_m(module: str, *args: str) -> list[str]:
    """``python -m MODULE ARGS`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def cli(*args: str) -> list[str]:
    """``routeyard ARGS`` (``python -m router.cli``)."""
    return python_m("router.cli", *args)


def run_cli(*args: str, env: dict[str, str] | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a one-shot ``routeyard`` command to its end; its output as text."""
    return subprocess.run(cli(*args), cwd=ROOT, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


# -- readiness ------------------------------------------------------------------------------

Ready = Callable[["Process"], Any]


def http_ok(url: str) -> Ready:
    """Ready once ``GET url`` answers 200."""
    def check(_process: Process) -> bool:
        try:
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    return check


def log_line(pattern: str) -> Ready:
    """Ready once this launch has logged a line matching the regular expression."""
    return lambda process: process.find_log(pattern, this_launch=True)


# -- processes ------------------------------------------------------------------------------

class Process:
    """One command in its own session, logging to ``log``; see the module docstring."""

    def __init__(self, argv: Sequence[str], log: Path, *, ready: Ready | None = None,
                 env: dict[str, str] | None = None, drop_env: tuple[str, ...] = (),
                 ready_timeout: float = 30, name: str | None = None) -> None:
        self.argv = list(argv)
        self.log = log
        self.ready = ready
        #: Set over the inherited environment, read at each launch.
        self.env = dict(env or {})
        #: Inherited variables with these prefixes are left out (``OTEL_`` …).
        self.drop_env = drop_env
        self.ready_timeout = ready_timeout
        self.name = name or " ".join(self.argv[1:4])
        self.popen: subprocess.Popen[bytes] | None = None
        self._log_start = 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- life cycle ----------------------------------------------------------------------
    def environment(self) -> dict[str, str]:
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(self.drop_env)}
        return {**inherited, **self.env}

    def launch(self) -> Self:
        """Start the command and return at once (``wait_ready`` waits for it)."""
        assert not self.running, f"{self} is running already"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self._log_start = out.tell()
            self.popen = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=ROOT, env=self.environment(), start_new_session=True)
        return self

    def wait_ready(self, timeout: float | None = None) -> Self:
        """Return once the readiness check passes; kill the process and raise with its
        log's tail if it exits first or is not ready within ``timeout`` seconds."""
        assert self.popen is not None, f"{self} was never launched"
        timeout = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            code = self.popen.poll()
            if code is not None:
                raise RuntimeError(f"{self} exited with {code} before it was ready:\n"
                                   f"{self.tail()}")
            if self.ready is None or self.ready(self):
                return self
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self} not ready after {timeout}s:\n{self.tail()}")
            time.sleep(POLL)

    def start(self) -> Self:
        return self.launch().wait_ready()

    def terminate(self) -> None:
        """SIGTERM to the process group, without waiting."""
        if self.running:
            self._signal_group(signals.SIGTERM)

    def stop(self, grace: float = 10) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited after ``grace`` seconds; the exit
        status (None if it never ran)."""
        self.terminate()
        return self._reap(grace)

    def kill(self) -> int | None:
        """SIGKILL the process group: no goodbye to open connections."""
        if self.running:
            self._signal_group(signals.SIGKILL)
        return self._reap(5)

    def restart(self) -> Self:
        """Kill, then start again: the same command, environment and log."""
        self.kill()
        return self.start()

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the leader process only."""
        assert self.running, f"{self} is not running"
        os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        """The exit status, once the process exits on its own (or TimeoutExpired)."""
        assert self.popen is not None
        return self.popen.wait(timeout)

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)

    def _reap(self, grace: float) -> int | None:
        if self.popen is None:
            return None
        try:
            return self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            self._signal_group(signals.SIGKILL)
            return self.popen.wait(5)

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self} was never launched"
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    # -- the log -------------------------------------------------------------------------
    def log_text(self, *, this_launch: bool = False) -> str:
        """The log so far (of every launch, or of the latest one)."""
        if not self.log.exists():
            return ""
        with self.log.open("rb") as f:
            if this_launch:
                f.seek(self._log_start)
            return f.read().decode(errors="replace")

    def tail(self, chars: int = 3000) -> str:
        return self.log_text()[-chars:]

    def find_log(self, pattern: str, *, this_launch: bool = False) -> re.Match[str] | None:
        return re.search(pattern, self.log_text(this_launch=this_launch), re.MULTILINE)

    def wait_for_log(self, pattern: str, timeout: float = 10, *,
                     this_launch: bool = False) -> re.Match[str]:
        """The first match of ``pattern`` in the log, once there is one."""
        return wait_until(lambda: self.find_log(pattern, this_launch=this_launch), timeout,
                          f"{self} logs {pattern!r}")


def start_all(processes: Iterable[Process]) -> list[Process]:
    """Launch every process, then wait for each: their start-ups overlap."""
    started = list(processes)
    try:
        for process in started:
            process.launch()
        for process in started:
            process.wait_ready()
    except BaseException:
        stop_all(started)
        raise
    return started


def stop_all(processes: Iterable[Process], grace: float = 10) -> None:
    """SIGTERM every process, then wait for each (SIGKILL past ``grace`` seconds)."""
    running = [p for p in processes if p.running]
    for process in running:
        process.terminate()
    deadline = time.monotonic() + grace
    for process in running:
        process._reap(max(0.0, deadline - time.monotonic()))


@contextlib.contextmanager
def running(processes: Iterable[Process], grace: float = 10) -> Iterator[list[Process]]:
    """``start_all`` on entry, ``stop_all`` on exit."""
    started = start_all(processes)
    try:
        yield started
    finally:
        stop_all(started, grace)


# -- fake engines ---------------------------------------------------------------------------

class FakeEngine(Process):
    """``routeyard fake-engine`` for one task and its models, on a port that stays the same
    across restarts; ``latency_ms`` is its default latency (a launch may choose another)."""

    def __init__(self, task: str, models: Sequence[str], log: Path, *, port: int | None = None,
                 latency_ms: float = 0, name: str | None = None,
                 loras: Sequence[str] = ()) -> None:
        self.task = task
        self.models = list(models)
        #: LoRA adapters of the first model loaded at each start (``--lora``).
        self.loras = list(loras)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.default_latency_ms = self.latency_ms = latency_ms
        super().__init__(self._argv(), log, ready=http_ok(f"{self.url}/health"),
                         name=name or f"fake-engine {task} :{self.port}")

    def _argv(self) -> list[str]:
        args = ["fake-engine", "--task", self.task, "--port", str(self.port)]
        for model in self.models:
            args += ["--model", model]
        for lora in self.loras:
            args += ["--lora", lora]
        if self.latency_ms:
            args += ["--latency-ms", str(self.latency_ms)]
        return cli(*args)

    def launch(self, latency_ms: float | None = None) -> Self:
        self.latency_ms = self.default_latency_ms if latency_ms is None else latency_ms
        self.argv = self._argv()
        return super().launch()

    def start(self, latency_ms: float | None = None) -> Self:
        return self.launch(latency_ms).wait_ready()

    def restart(self, latency_ms: float | None = None) -> Self:
        self.kill()
        return self.start(latency_ms)

    # -- introspection (the fake engine's /_fake endpoints) ------------------------------
    def requests(self, path: str | None = None) -> list[dict[str, Any]]:
        params = {"path": path} if path else None
        return httpx.get(f"{self.url}/_fake/requests", params=params, timeout=10).json()

    def count(self, path: str | None = None) -> int:
        return len(self.requests(path))

    def reset(self) -> None:
        httpx.post(f"{self.url}/_fake/reset", timeout=10).raise_for_status()

    def load_lora(self, name: str) -> None:
        httpx.post(f"{self.url}/_fake/load_lora", json={"lora_name": name},
                   timeout=10).raise_for_status()

    def unload_lora(self, name: str) -> None:
        httpx.post(f"{self.url}/_fake/unload_lora", json={"lora_name": name},
                   timeout=10).raise_for_status()


# -- the router -----------------------------------------------------------------------------

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, headers: dict[str, str] | None = None) -> Samples:
    """A Prometheus text page parsed: (sample name, sorted labels) → value."""
    response = httpx.get(url, timeout=10, headers=headers)
    assert response.status_code == 200, response.text
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


class Router(Process):
    """``routeyard serve --config CONFIG`` on a free port, with a client and admin helpers.

    Ready once ``/health`` answers and, with several workers, once every worker has
    answered ``/admin/config`` (``every_worker=False`` skips that). The admin helpers send
    ``admin_key`` when the config has ``auth:``; ``client`` sends nothing of its own."""

    def __init__(self, config: Path, *, workers: int = 1, env: dict[str, str] | None = None,
                 drop_env: tuple[str, ...] = (), every_worker: bool = True,
                 admin_key: str | None = None, log_dir: Path | None = None) -> None:
        self.config = config
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.every_worker = every_worker
        self.admin_headers = {"authorization": f"Bearer {admin_key}"} if admin_key else {}
        argv = cli("serve", "--config", str(config), "--port", str(self.port),
                   "--workers", str(workers))
        super().__init__(argv, (log_dir or config.parent) / f"router-{self.port}.log",
                         ready=http_ok(f"{self.url}/health"), env=env, drop_env=drop_env,
                         name=f"router :{self.port}")
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def launch(self) -> Self:
        if self.client.is_closed:
            self.client = httpx.Client(base_url=self.url, timeout=30)
        return super().launch()

    def wait_ready(self, timeout: float | None = None) -> Self:
        super().wait_ready(timeout)
        if self.workers > 1 and self.every_worker:
            self.wait_workers()
        return self

    def terminate(self) -> None:
        self.client.close()  # no idle keep-alive connection for the shutdown to close
        super().terminate()

    # -- admin --------------------------------------------------------------------------
    def admin(self) -> dict[str, Any]:
        return self._get("/admin/config")

    def _get(self, path: str) -> Any:
        r = self.client.get(path, headers=self.admin_headers)
        assert r.status_code == 200, f"{path} answered {r.status_code}: {r.text}"
        return r.json()

    def config_sha(self) -> str:
        return self.admin()["sha256"]

    def fresh_admin(self) -> dict[str, Any]:
        """``/admin/config`` on a new connection (with several workers, the kernel picks
        the worker that answers)."""
        r = httpx.get(f"{self.url}/admin/config", timeout=10,
                      headers={"connection": "close", **self.admin_headers})
        assert r.status_code == 200, f"/admin/config answered {r.status_code}: {r.text}"
        return r.json()

    def wait_workers(self, timeout: float = 20) -> None:
        """Until each of the workers has answered (``pid`` tells them apart)."""
        seen: set[int] = set()

        def all_answered() -> bool:
            seen.add(self.fresh_admin()["pid"])
            return len(seen) >= self.workers

        wait_until(all_answered, timeout, f"all {self.workers} workers of {self} answer")

    def wait_for_sha(self, sha: str, timeout: float = 2.0) -> float:
        """Seconds until the router serves config ``sha``; fails after ``timeout``."""
        started = time.monotonic()
        wait_until(lambda: self.config_sha() == sha, timeout,
                   f"{self} loads config {sha[:12]}")
        return time.monotonic() - started

    def rewrite(self, text: str, timeout: float = 5.0) -> None:
        """Replace the routes file (a temp file renamed over it) and wait until it is live."""
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config)
        self.wait_for_sha(sha256(text), timeout)

    def backends(self, model: str) -> list[dict[str, Any]]:
        return self._get("/admin/backends")[model]["backends"]

    def backend_state(self, model: str, url: str) -> str:
        (entry,) = [b for b in self.backends(model) if b["url"] == url]
        return entry["state"]

    def wait_healthy_backends(self, *models: str, timeout: float = 5.0) -> None:
        """Until every backend of ``models`` is healthy in the router's view (an engine a
        previous test stopped is back, and the health checks have seen it)."""
        def all_healthy() -> bool:
            view = self._get("/admin/backends")
            return all(b["state"] == "healthy" for m in models for b in view[m]["backends"])

        wait_until(all_healthy, timeout, f"every backend of {', '.join(models)} is healthy")

    # -- observability ------------------------------------------------------------------
    def scrape(self) -> Samples:
        """``GET /metrics`` parsed (with the admin key when the router has one:
        ``/metrics`` needs it under ``auth:``)."""
        return scrape(f"{self.url}/metrics", self.admin_headers)

    def access_lines(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.log_text().splitlines()
                if line.startswith("{") and '"routeyard.access"' in line]

    def access_line(self, request_id: str, timeout: float = 5) -> dict[str, Any]:
        """The access log line of ``request_id`` (lines are flushed every 100 ms)."""
        def line() -> dict[str, Any] | None:
            return next((x for x in self.access_lines() if x["request_id"] == request_id),
                        None)

        return wait_until(line, timeout, f"an access log line for {request_id} in {self.log}")


def start_router(tmp_path: Path, text: str, *, config: Path | None = None,
                 **options: Any) -> Router:
    """A started router on ``text`` (written to ``tmp_path/routes.yaml``) or on the file
    ``config``; ``options`` go to ``Router``."""
    if config is None:
        config = tmp_path / "routes.yaml"
        config.write_text(text)
    return Router(config, log_dir=tmp_path, **options).start()
