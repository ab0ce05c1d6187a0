"""Batch visible: batch lines in the request and token counters (``origin="batch"``, the
key that created the batch), the line counters of the process that runs them, and the
batch gauges read from the batch database by every router, also when a separate
``routeyard batch-worker`` runs the batches (which counts its lines on a metrics port of
its own)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import openai

from router.tenants.config import hash_key
from tests.harness import (
    Process,
    Router,
    Samples,
    cli,
    log_line,
    run_cli,
    scrape,
    wait_until,
)
from tests.observability.conftest import CLEAN_ENV, chat_routes

KEY_A = "ry-team-a-" + "a" * 40
KEY_ADMIN = "ry-admin-" + "c" * 40
TERMINAL = ("completed", "failed", "expired", "cancelled")


def _routes(engines: dict[str, str], tmp: Path, workers: int) -> str:
    return chat_routes(engines) + (
        "auth:\n  keys:\n    - id: team-a\n"
        f"      hash: {hash_key(KEY_A)}\n      models: ['obs-*']\n"
        f"  admin_keys:\n    - id: ops\n      hash: {hash_key(KEY_ADMIN)}\n"
        # relative paths: beside the routes file, whatever the working directory
        "batch:\n  database_url: sqlite+aiosqlite:///batch.db\n"
        f"  storage: {{url: ./files}}\n  poll_interval: 100ms\n  workers: {workers}\n")


def _lines(prefix: str, count: int) -> bytes:
    return "\n".join(json.dumps({
        "custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "obs-chat", "max_tokens": 2,
                 "messages": [{"role": "user", "content": f"{prefix}-{i}"}]}})
        for i in range(count)).encode()


def _create(router: Router, data: bytes) -> str:
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key=KEY_A, max_retries=0)
    upload = client.files.create(file=("in.jsonl", data), purpose="batch")
    return client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                 completion_window="24h").id


def _ended(router: Router, batch_id: str, timeout: float = 30) -> openai.types.Batch:
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key=KEY_A, max_retries=0)
    return wait_until(lambda: (b := client.batches.retrieve(batch_id)).status in TERMINAL
                      and b, timeout, f"batch {batch_id} ends")


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_batch_lines_are_counted_where_they_run(engines: dict[str, str], tmp_path: Path,
                                               launch_router) -> None:
    router = launch_router(_routes(engines, tmp_path, workers=1), drop_env=CLEAN_ENV,
                           admin_key=KEY_ADMIN)
    done = _ended(router, _create(router, _lines("seen", 3)))
    assert done.status == "completed" and done.request_counts.completed == 3
    assert (tmp_path / "batch.db").is_file() and (tmp_path / "files").is_dir()
    samples = router.scrape()
    line = {"model": "obs-chat", "group": "chat", "backend": engines["generate"],
            "key": "team-a", "origin": "batch"}
    assert _value(samples, "routeyard_requests_total", **line, code="200") == 3
    assert _value(samples, "routeyard_tokens_total", model="obs-chat", key="team-a",
                  origin="batch", type="output") == 3 * 2
    online = {labels: v for (name, labels), v in samples.items()
              if name == "routeyard_requests_total" and ("origin", "online") in labels}
    assert not online  # the lines were counted once, as batch lines
    assert _value(samples, "routeyard_batch_lines_total", outcome="completed") == 3
    assert _value(samples, "routeyard_batch_lines_total", outcome="failed") == 0
    assert _value(samples, "routeyard_batch_lines_in_flight") == 0
    assert _value(samples, "routeyard_batches", status="completed") == 1
    assert _value(samples, "routeyard_batches", status="validating") == 0
    assert _value(samples, "routeyard_batch_oldest_queued_age_seconds") == 0


def test_batch_gauges_show_in_the_router_when_a_batch_worker_runs_them(
        engines: dict[str, str], tmp_path: Path, launch_router) -> None:
    routes = _routes(engines, tmp_path, workers=0)  # the router runs no batch
    router = launch_router(routes, drop_env=CLEAN_ENV, admin_key=KEY_ADMIN)
    batch_id = _create(router, _lines("elsewhere", 2))

    def queued() -> Samples | None:
        samples = router.scrape()
        waiting = _value(samples, "routeyard_batch_oldest_queued_age_seconds")
        return samples if waiting > 0 else None

    samples = wait_until(queued, 10, "the batch waits for a worker")
    assert _value(samples, "routeyard_batches", status="validating") == 1
    shared = tmp_path / "multiproc"  # as if inherited from a `routeyard serve` environment
    shared.mkdir()
    worker = Process(cli("batch-worker", "--config", str(router.config)),
                     tmp_path / "batch-worker.log", ready=log_line("batch worker running"),
                     env={"ROUTEYARD_BATCH_WORKER_METRICS_PORT": "0",
                          "PROMETHEUS_MULTIPROC_DIR": str(shared)},
                     drop_env=CLEAN_ENV, name="batch-worker")
    with worker:
        found = worker.find_log(r"metrics on (http://127\.0\.0\.1:\d+/metrics)")
        assert found, worker.tail()
        assert _ended(router, batch_id).status == "completed"

        def counted() -> Samples | None:  # the worker's figures are flushed every second
            samples = scrape(found[1])
            return samples if _value(samples, "routeyard_batch_lines_total",
                                     outcome="completed") == 2 else None

        mine = wait_until(counted, 10, "the batch-worker's scrape counts the batch's lines")
        line = {"model": "obs-chat", "group": "chat", "backend": engines["generate"],
                "key": "team-a", "origin": "batch"}
        assert _value(mine, "routeyard_requests_total", **line, code="200") == 2
        assert _value(mine, "routeyard_tokens_total", model="obs-chat", key="team-a",
                      origin="batch", type="output") == 2 * 2
        assert _value(mine, "routeyard_batch_lines_total", outcome="failed") == 0
        assert _value(mine, "routeyard_batch_lines_in_flight") == 0
        assert _value(mine, "routeyard_backend_up", backend=engines["generate"]) == 1
        assert ("routeyard_config_info", (("sha256", router.config_sha()),)) in mine
        # the database's gauges are the routers' (one series per router, not per worker)
        assert not [k for k in mine if k[0] in ("routeyard_batches",
                                                "routeyard_batch_oldest_queued_age_seconds")]
        assert list(shared.iterdir()) == []  # one process: no shared metric files

        def completed() -> Samples | None:  # the router's figures are cached a few seconds
            samples = router.scrape()
            return samples if _value(samples, "routeyard_batches",
                                     status="completed") == 1 else None

        samples = wait_until(completed, 15, "the router's scrape shows the batch completed")
    assert _value(samples, "routeyard_batches", status="validating") == 0
    assert _value(samples, "routeyard_batch_oldest_queued_age_seconds") == 0
    # its lines ran in the batch-worker process and are counted there, not here
    assert _value(samples, "routeyard_batch_lines_total", outcome="completed") == 0


def test_a_batch_worker_whose_metrics_port_is_taken_exits_with_one_line(
        engines: dict[str, str], tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(_routes(engines, tmp_path, workers=1))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli("batch-worker", "--config", str(routes), "--metrics-port", str(port))
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"routeyard: cannot listen on 127.0.0.1:{port}: Address already in use"]
