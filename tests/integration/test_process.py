"""``routeyard serve`` and ``routeyard demo`` as processes: refused settings and a busy
port are one line on stderr with the right exit status; with ``--workers 2`` every line of
the main process and of each worker has one format (text or JSON) at the configured level,
the start summary comes first, a reload is one line for all workers, and stopping logs no
cancelled tasks; ``demo`` removes its routes file when it stops."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.conftest import routes_yaml
from tests.harness import (
    ROOT,
    Router,
    cli,
    free_port,
    free_ports_in_a_row,
    run_cli,
    sha256,
    wait_until,
)

#: ``TIME LEVEL WORKER LOGGER: MESSAGE`` (router/logs.py).
TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) "
    r"(?P<worker>main|Sanic-Server-\d+-\d+) (?P<logger>[\w.]+): (?P<message>.*)$")
WORKERS = {"main", "Sanic-Server-0-0", "Sanic-Server-1-0"}
#: Reloads only on SIGHUP, which reaches every worker at once (no watcher to arm first).
SIGHUP_ONLY = {"ROUTEYARD_WATCH": "false"}


@pytest.fixture
def routes(tmp_path: Path, engines: dict[str, str]) -> Path:
    path = tmp_path / "routes.yaml"
    path.write_text(routes_yaml(engines))
    return path


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another socket listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize(("variable", "value"), [
    ("ROUTEYARD_PORT", "abc"), ("ROUTEYARD_LOG_LEVEL", "verbose"),
    ("ROUTEYARD_WORKERS", "0"), ("ROUTEYARD_LOG_FORMAT", "xml"),
])
def test_a_bad_setting_is_one_line_and_status_2(routes: Path, variable: str,
                                                value: str) -> None:
    done = run_cli("serve", "--config", str(routes), env={variable: value})
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"routeyard: {variable}=") and "Input should be" in line


def test_a_bad_flag_value_is_one_line_and_status_2(routes: Path) -> None:
    done = run_cli("serve", "--config", str(routes), "--workers", "0")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "routeyard: --workers 0: Input should be greater than or equal to 1"]


def test_a_busy_port_is_one_line_and_status_1(routes: Path, busy_port: int) -> None:
    done = run_cli("serve", "--config", str(routes), "--port", str(busy_port),
                   "--workers", "2")
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [
        f"routeyard: cannot listen on 127.0.0.1:{busy_port}: Address already in use"]


def test_demo_on_a_busy_port_is_one_line_and_status_1(busy_port: int) -> None:
    done = run_cli("demo", "--port", str(busy_port), "--engine-base-port", str(free_port()))
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [
        f"routeyard demo: cannot listen on 127.0.0.1:{busy_port}: Address already in use"]


def text_lines(router: Router) -> list[re.Match[str]]:
    """Every line of the router's log, each of which must be in the text format."""
    lines = router.log_text().splitlines()
    bad = [line for line in lines if not TEXT_LINE.match(line)]
    assert not bad, f"lines not in the log format: {bad}"
    return [m for line in lines if (m := TEXT_LINE.match(line))]


def test_workers_log_in_one_format_and_a_reload_once(routes: Path, engines: dict) -> None:
    router = Router(routes, workers=2, log_dir=routes.parent,
                    env={"ROUTEYARD_LOG_LEVEL": "debug", **SIGHUP_ONLY}).start()
    try:
        lines = text_lines(router)
        summary = next(m for m in lines if m["message"].startswith("routeyard "))
        assert summary["worker"] == "main" and summary["level"] == "INFO"
        assert re.fullmatch(r"routeyard \S+: 5 models, 5 backends from \S+routes\.yaml; "
                            r"auth off; batch off; tracing off; metrics on; access log off; "
                            r"2 worker\(s\)", summary["message"]), summary["message"]
        serving = [m for m in lines if m["message"].startswith("serving on ")]
        assert [m["message"] for m in serving] == [
            f"serving on http://127.0.0.1:{router.port} with 2 worker(s)"]
        # DEBUG reaches the workers too (Sanic's "Process ack" is logged in each).
        acks = {m["worker"] for m in lines if m["level"] == "DEBUG"
                and m["message"].startswith("Process ack")}
        assert acks == {"Sanic-Server-0-0", "Sanic-Server-1-0"}

        routes.write_text("models: [\n")  # refused by each worker; logged once
        router.signal(signal.SIGHUP)
        refused_by: dict[object, int] = {}  # worker (its loaded_at) → refused reloads

        def both_refused() -> bool:
            view = router.fresh_admin()
            refused_by[view["loaded_at"]] = view["reloads"]["error"]
            return len(refused_by) == 2 and all(refused_by.values())

        wait_until(both_refused, 10, "both workers refused the edit")
        refused = [m for m in text_lines(router) if "reload refused" in m["message"]
                   and m["level"] == "ERROR"]
        assert len(refused) == 1, [m.group(0) for m in refused]
        assert refused[0]["logger"] == "routeyard.reload"

        added = routes_yaml(engines) + (f"  added-model:\n    backends:\n"
                                        f"      - url: {engines['generate']}\n"
                                        "    endpoints: [chat]\n")
        routes.write_text(added)
        router.signal(signal.SIGHUP)
        wait_until(lambda: {router.fresh_admin()["sha256"] for _ in range(20)}
                   == {sha256(added)}, 10, "every worker serves the fixed file")
        reloaded = [m for m in text_lines(router) if m["level"] == "INFO"
                    and m["message"].startswith("config reloaded")]
        assert len(reloaded) == 1 and reloaded[0]["message"].endswith(
            "6 models; added: added-model"), [m.group(0) for m in reloaded]
    finally:
        status = router.stop()
    assert status == 0
    lines = text_lines(router)  # the shutdown's lines too
    assert {m["worker"] for m in lines} == WORKERS
    assert not [m.group(0) for m in lines if "cancelled" in m["message"]]


def test_json_format_in_every_process_at_the_level(routes: Path) -> None:
    router = Router(routes, workers=2, log_dir=routes.parent,
                    env={"ROUTEYARD_LOG_FORMAT": "json", "ROUTEYARD_LOG_LEVEL": "info",
                         **SIGHUP_ONLY}).start()
    try:
        routes.write_text("models: [\n")
        router.signal(signal.SIGHUP)
        wait_until(lambda: router.find_log(r'"message":"config reload refused'), 10,
                   "the refused edit is logged")
    finally:
        router.stop()
    entries = [orjson.loads(line) for line in router.log_text().splitlines()]
    assert {e["worker"] for e in entries} == WORKERS
    for entry in entries:
        assert {"time", "level", "logger", "worker", "pid", "message"} <= entry.keys(), entry
        assert entry["level"] != "DEBUG"
    [summary] = [e for e in entries if e["message"].startswith("routeyard ")]
    assert (summary["models"], summary["workers"], summary["auth"]) == (5, 2, "off")
    assert any(e["logger"] == "sanic.server" and e["worker"] == "Sanic-Server-1-0"
               for e in entries)


def test_warning_level_silences_info_in_every_process(routes: Path) -> None:
    router = Router(routes, workers=2, log_dir=routes.parent,
                    env={"ROUTEYARD_LOG_LEVEL": "WARNING", **SIGHUP_ONLY}).start()
    try:
        routes.write_text("models: [\n")
        router.signal(signal.SIGHUP)
        router.wait_for_log("ERROR Sanic-Server-0-0 routeyard.reload: config reload refused")
    finally:
        router.stop()
    assert {m["level"] for m in text_lines(router)} == {"ERROR"}


def test_demo_removes_its_routes_file_on_ctrl_c(tmp_path: Path) -> None:
    # the router's port, then the engines' base and the four after it
    port = free_ports_in_a_row(6)
    base = port + 1
    log = tmp_path / "demo.log"
    with log.open("wb") as out:
        demo = subprocess.Popen([*cli("demo", "--port", str(port), "--engine-base-port",
                                      str(base))], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        # "serving on" is logged once the router handles Ctrl-C (after it answers)
        wait_until(lambda: demo.poll() is not None or "serving on" in log.read_text(), 60,
                   "the demo serves")
        assert demo.poll() is None, log.read_text()
        routes = Path(re.search(r"\(routes file (\S+)\)", log.read_text())[1])
        assert routes.exists()
        demo.send_signal(signal.SIGINT)
        assert demo.wait(30) == 0
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(5)
    assert not routes.exists()
    assert "Traceback" not in log.read_text()


def test_a_stop_while_starting_stops_at_once(tmp_path: Path) -> None:
    """SIGTERM while the start waits on a batch database that never answers (a socket
    that accepts and stays silent): the process stops at once, without a traceback (it
    used to wait for the database driver's own timeout)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        routes = tmp_path / "routes.yaml"
        routes.write_text(
            "models:\n  m:\n    backends: [{url: 'http://127.0.0.1:9'}]\n"
            "    endpoints: [chat]\n"
            f"batch:\n  database_url: postgresql+asyncpg://u@127.0.0.1:"
            f"{silent.getsockname()[1]}/x\n  storage: {{url: ./files}}\n")
        log = tmp_path / "serve.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([*cli("serve", "--config", str(routes), "--port", "0")],
                                    cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_until(lambda: "Starting worker" in log.read_text(), 30, "the start began")
            proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            assert proc.wait(10) == 0
            assert time.monotonic() - started < 5
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    text = log.read_text()
    assert "Traceback" not in text and "stopped while starting" in text, text[-2000:]
