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
import socket
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
from tests.harness import (
    FakeEngine,
    Process,
    eventually,
    free_port,
    http_ok,
    python_m,
    running,
    wait_until,
)

PG_URL = os.environ.get("ROUTEYARD_TEST_PG", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
TERMINAL = ("completed", "failed", "expired", "cancelled")
FAST = {"poll_interval": 0.1, "retry_backoff": 0.05, "max_retry_backoff": 0.2}


def run_async(coro: Any) -> Any:
    """Run a coroutine on a private loop in a thread (safe beside pytest-asyncio's loop)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


@pytest.fixture(scope="session")
def batch_logs(logs: Path) -> Path:
    (logs / "batch").mkdir(exist_ok=True)
    return logs / "batch"


@pytest.fixture(scope="session")
def batch_engines(batch_logs: Path) -> Iterator[dict[str, str]]:
    """generate (chat-model), embed (embed-model), slow (300 ms per request), flaky."""
    specs = {"generate": ("generate", "chat-model", 0), "embed": ("embed", "embed-model", 0),
             "slow": ("generate", "chat-model", 300), "flaky": ("generate", "chat-model", 0)}
    engines = {name: FakeEngine(task, [model], batch_logs / f"engine-{name}.log",
                                latency_ms=latency)
               for name, (task, model, latency) in specs.items()}
    with running(engines.values()):
        yield {name: engine.url for name, engine in engines.items()}


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
    endpoint = f"http://127.0.0.1:{port}"
    moto = Process(python_m("moto.server", "-H", "127.0.0.1", "-p", str(port)),
                   batch_logs / "moto.log", ready=http_ok(f"{endpoint}/moto-api/"))
    with moto:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                     aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket="batches")
        yield S3(endpoint, "batches")


# servers ----------------------------------------------------------------------------


class Server(Process):
    """``python -m tests.batch.server serve SPEC PORT`` on a free port."""

    def __init__(self, tmp: Path, config: dict[str, Any], engines: dict[str, str],
                 storage: Path | None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = config
        self.storage = storage
        spec = write_spec(tmp / f"spec-{self.port}.json", config, engines)
        super().__init__(python_m("tests.batch.server", "serve", str(spec), str(self.port)),
                         tmp / f"server-{self.port}.log", ready=http_ok(f"{self.url}/health"),
                         name=f"batch server :{self.port}")

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


@pytest.fixture(scope="session")
def local_server(tmp_path_factory: pytest.TempPathFactory,
                 batch_engines: dict[str, str]) -> Iterator[Server]:
    """SQLite + a local directory; batch files up to 8 MiB, any file up to 300 MiB."""
    tmp = tmp_path_factory.mktemp("local-server")
    config = {"database_url": f"sqlite+aiosqlite:///{tmp}/batch.db",
              "storage": {"url": str(tmp / "files")}, "workers": 2, "lease": 5,
              "max_batch_file_bytes": "8MiB", "max_file_bytes": "300MiB", **FAST}
    with Server(tmp, config, batch_engines, tmp / "files") as server:
        yield server


@pytest.fixture(scope="session")
def s3pg_server(tmp_path_factory: pytest.TempPathFactory, batch_engines: dict[str, str],
                s3: S3, pg_schemas: Callable[[], str]) -> Iterator[Server]:
    """PostgreSQL (own schema) + S3 on moto."""
    tmp = tmp_path_factory.mktemp("s3pg-server")
    config = {"database_url": PG_URL, "database_schema": pg_schemas(), "storage": s3.storage(),
              "workers": 2, "lease": 5, **FAST}
    with Server(tmp, config, batch_engines, None) as server:
        yield server


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
    return wait_until(lambda: (b := client.batches.retrieve(batch_id)).status in until and b,
                      timeout, f"batch {batch_id} is {' or '.join(until)}", interval=0.05)


def read_lines(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


async def submit(service: BatchService, lines: list[Any], tenant: str | None = None,
                 endpoint: str = "/v1/chat/completions", key: str | None = None) -> str:
    """A batch of ``tenant``'s, created with API key ``key`` (default: the tenant's id, as
    the test server names keys)."""
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
                                               "completion_window": "24h"},
                                        key=tenant if key is None else key)
    return made["id"]


async def finished(service: BatchService, batch_id: str, timeout: float = 20) -> dict:
    async def ended() -> dict | None:
        batch = await service.get_batch(None, batch_id)
        return batch if batch["status"] in TERMINAL else None

    return await eventually(ended, timeout, f"batch {batch_id} ends", interval=0.05)


async def lines_of(service: BatchService, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    _size, chunks = await service.file_content(None, file_id)
    data = b"".join([c async for c in chunks])
    return [orjson.loads(x) for x in data.splitlines()]
