"""Fixtures for the batch tests: fake engines, servers, PostgreSQL schemas, S3 (moto).

Real services only: engines are ``routeyard fake-engine`` processes, servers are
``tests.batch.server`` processes on free loopback ports, S3 is ``moto`` in server mode,
PostgreSQL is the machine's (127.0.0.1:5432, database ``test``). Each PostgreSQL user
gets its own schema, dropped at the end. Without PostgreSQL the tests that need it skip,
except under CI (``CI=true``), where they fail.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from router.batch import BatchService
from router.batch.models import new_id
from router.batch.objects import Objects
from tests.conftest import ROOT, free_port, stop, wait_healthy

PG_URL = os.environ.get("ROUTEYARD_TEST_PG", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
TERMINAL = ("completed", "failed", "expired", "cancelled")
FAST = {"poll_interval": 0.1, "retry_backoff": 0.05, "max_retry_backoff": 0.2}


def run_async(coro: Any) -> Any:
    """Run a coroutine on a private loop in a thread (safe beside pytest-asyncio's loop)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], stdout=log.open("ab"),
                            stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)


def kill9(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(5)


@pytest.fixture(scope="session")
def batch_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("batch-logs")


@pytest.fixture(scope="session")
def batch_engines(batch_logs: Path) -> Iterator[dict[str, str]]:
    """generate (chat-model), embed (embed-model), slow (300 ms per request), flaky."""
    specs = {
        "generate": ["--task", "generate", "--model", "chat-model"],
        "embed": ["--task", "embed", "--model", "embed-model"],
        "slow": ["--task", "generate", "--model", "chat-model", "--latency-ms", "300"],
        "flaky": ["--task", "generate", "--model", "chat-model"],
    }
    procs, urls = [], {}
    for name, args in specs.items():
        port = free_port()
        urls[name] = f"http://127.0.0.1:{port}"
        procs.append(spawn(["-m", "router.cli", "fake-engine", *args, "--port", str(port)],
                           batch_logs / f"engine-{name}.log"))
    try:
        for (_name, url), proc in zip(urls.items(), procs, strict=True):
            wait_healthy(f"{url}/health", proc)
        yield urls
    finally:
        for proc in procs:
            stop(proc)


def engine_requests(engine: str, marker_prefix: str) -> list[dict]:
    """The engine's log of requests whose marker (first message / prompt) has the prefix."""
    entries = httpx.get(f"{engine}/_fake/requests", timeout=10).json()
    found = []
    for entry in entries:
        body = entry.get("json") or {}
        marker = body.get("messages", [{}])[0].get("content") if "messages" in body \
            else body.get("prompt", body.get("input"))
        if isinstance(marker, str) and marker.startswith(marker_prefix):
            found.append(entry)
    return found


# PostgreSQL --------------------------------------------------------------------------


def _pg_available() -> str | None:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            pass
    except OSError as exc:
        return str(exc)

    async def probe() -> None:
        import asyncpg

        conn = await asyncpg.connect(PG_URL.replace("+asyncpg", ""))
        await conn.close()

    try:
        run_async(probe())
    except Exception as exc:
        return str(exc)
    return None


@pytest.fixture(scope="session")
def pg_schemas() -> Iterator[Callable[[], str]]:
    """Make unique PostgreSQL schemas; all are dropped at the end of the session."""
    problem = _pg_available()
    if problem is not None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"PostgreSQL at {PG_URL} is required under CI: {problem}")
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {problem}")
    made: list[str] = []

    def new() -> str:
        name = f"batch_test_{os.getpid()}_{secrets.token_hex(4)}"
        made.append(name)
        return name

    yield new

    async def drop() -> None:
        import asyncpg

        conn = await asyncpg.connect(PG_URL.replace("+asyncpg", ""))
        for name in made:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        await conn.close()

    run_async(drop())


# S3 (moto in server mode) -----------------------------------------------------------


@dataclass
class S3:
    endpoint: str
    bucket: str

    def keys(self) -> list[str]:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        listing = client.list_objects_v2(Bucket=self.bucket)
        return [o["Key"] for o in listing.get("Contents", [])]

    def storage(self) -> dict[str, Any]:
        return {"url": f"s3://{self.bucket}/routeyard", "endpoint": self.endpoint,
                "region": "us-east-1", "access_key_id": "testing",
                "secret_access_key": "testing", "allow_http": True}


@pytest.fixture(scope="session")
def s3(batch_logs: Path) -> Iterator[S3]:
    import boto3

    port = free_port()
    proc = spawn(["-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                 batch_logs / "moto.log")
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{endpoint}/moto-api/", proc)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                     aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket="batches")
        yield S3(endpoint, "batches")
    finally:
        stop(proc)


# servers ----------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    config: dict[str, Any]
    storage: Path | None
    log: Path

    def client(self, tenant: str | None = "A") -> openai.OpenAI:
        key = "open" if tenant is None else f"key-{tenant}"
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0,
                             timeout=60)

    def http(self, tenant: str | None = "A") -> httpx.Client:
        key = "open" if tenant is None else f"key-{tenant}"
        return httpx.Client(base_url=self.url, timeout=60,
                            headers={"authorization": f"Bearer {key}"})


TENANTS = {"B": ["chat-model", "slow-model", "flaky-model", "chat-only-model"]}


def write_spec(path: Path, config: dict[str, Any], engines: dict[str, str],
               workers: int | None = None) -> Path:
    path.write_text(json.dumps({"config": config, "engines": engines, "tenants": TENANTS,
                                "workers": workers}))
    return path


def start_server(tmp: Path, config: dict[str, Any], engines: dict[str, str],
                 storage: Path | None) -> Server:
    port = free_port()
    spec = write_spec(tmp / f"spec-{port}.json", config, engines)
    log = tmp / f"server-{port}.log"
    proc = spawn(["-m", "tests.batch.server", "serve", str(spec), str(port)], log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{url}/health", proc)
    except RuntimeError:
        stop(proc)
        raise RuntimeError(f"batch server failed:\n{log.read_text()[-3000:]}") from None
    return Server(url, proc, config, storage, log)


@pytest.fixture(scope="session")
def local_server(tmp_path_factory: pytest.TempPathFactory,
                 batch_engines: dict[str, str]) -> Iterator[Server]:
    """SQLite + a local directory; batch files up to 8 MiB, any file up to 300 MiB."""
    tmp = tmp_path_factory.mktemp("local-server")
    config = {"database_url": f"sqlite+aiosqlite:///{tmp}/batch.db",
              "storage": {"url": str(tmp / "files")}, "workers": 2, "lease": 5,
              "max_batch_file_bytes": "8MiB", "max_file_bytes": "300MiB", **FAST}
    server = start_server(tmp, config, batch_engines, tmp / "files")
    yield server
    stop(server.proc)


@pytest.fixture(scope="session")
def s3pg_server(tmp_path_factory: pytest.TempPathFactory, batch_engines: dict[str, str],
                s3: S3, pg_schemas: Callable[[], str]) -> Iterator[Server]:
    """PostgreSQL (own schema) + S3 on moto."""
    tmp = tmp_path_factory.mktemp("s3pg-server")
    config = {"database_url": PG_URL, "database_schema": pg_schemas(), "storage": s3.storage(),
              "workers": 2, "lease": 5, **FAST}
    server = start_server(tmp, config, batch_engines, None)
    yield server
    stop(server.proc)


# helpers ------------------------------------------------------------------------------


def jsonl(lines: list[Any]) -> bytes:
    return b"".join((json.dumps(x) if not isinstance(x, str) else x).encode() + b"\n"
                    for x in lines)


def chat_line(custom_id: str, model: str = "chat-model", **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": custom_id}],
                     "max_tokens": 4, **body}}


def wait_batch(client: openai.OpenAI, batch_id: str, timeout: float = 30,
               until: tuple[str, ...] = TERMINAL) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        if time.monotonic() > deadline:
            raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout}s")
        time.sleep(0.05)


def read_lines(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


async def submit(service: BatchService, lines: list[Any], tenant: str | None = None,
                 endpoint: str = "/v1/chat/completions") -> str:
    data = jsonl(lines)
    file_id = new_id("file-")

    async def body() -> AsyncIterator[bytes]:
        yield data

    await service.objects.put_stream(Objects.key(file_id), body())
    await service.add_file(tenant, {
        "id": file_id, "purpose": "batch", "filename": "in.jsonl", "bytes": len(data),
        "lines": len(lines), "created_at": service.now(), "expires_at": None,
        "status": "processed", "object_key": Objects.key(file_id)})
    made = await service.create_batch(tenant, {"input_file_id": file_id, "endpoint": endpoint,
                                               "completion_window": "24h"})
    return made["id"]


async def finished(service: BatchService, batch_id: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while (batch := await service.get_batch(None, batch_id))["status"] not in TERMINAL:
        assert time.monotonic() < deadline, batch
        await asyncio.sleep(0.05)
    return batch


async def lines_of(service: BatchService, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    _size, chunks = await service.file_content(None, file_id)
    data = b"".join([c async for c in chunks])
    return [orjson.loads(x) for x in data.splitlines()]
