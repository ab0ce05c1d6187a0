"""Batch soak: one 50,000-line batch through a batch worker; is its memory flat?

    python -m benchmarks.batch_soak [--lines 50000] [--database URL] [--concurrency 64]

Starts ``benchmarks.fast_engine`` on loopback, then runs ``BatchService`` with one worker
in this process against it (SQLite in a temp dir, or the PostgreSQL of ``--database`` in
a schema of its own, dropped at the end). It samples this process's RSS every 0.5 s while
the batch runs. After the first 20 % of lines (pools and caches fill up there), RSS may
not grow by more than ``max(16 MiB, 10 %)`` for the verdict FLAT; otherwise GROWING. It
then checks that the output has exactly one line per ``custom_id``. Bounded: at most 15 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
from sqlalchemy import text

from benchmarks.procs import Supervisor, free_port, rss_kb, wait_healthy
from router.batch import BatchConfig, BatchService
from router.batch.db import create_engine
from router.batch.models import new_id
from router.batch.objects import Objects

MAX_SECONDS = 15 * 60


class Forward:
    """The smallest Dispatcher: keep-alive HTTP/1.1 to one engine over raw asyncio streams
    (httpx's pool costs more CPU than the batch machinery being measured)."""

    def __init__(self, url: str, connections: int) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = \
            asyncio.Queue()
        self.free = asyncio.Semaphore(connections)

    def check(self, tenant: str | None, url: str, body: dict) -> str | None:
        return None

    async def dispatch(self, url: str, body: bytes) -> tuple[int, bytes]:
        async with self.free:
            if self.idle.empty():
                conn = await asyncio.open_connection(self.host, self.port)
            else:
                conn = self.idle.get_nowait()
            reader, writer = conn
            writer.write(f"POST {url} HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: "
                         f"application/json\r\ncontent-length: {len(body)}\r\n\r\n"
                         .encode() + body)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            payload = await reader.readexactly(length)
            self.idle.put_nowait(conn)
            return status, payload

    def pressure(self) -> float:
        return 0.0

    def close(self) -> None:
        while not self.idle.empty():
            self.idle.get_nowait()[1].close()


async def _input(lines: int) -> AsyncIterator[bytes]:
    for start in range(0, lines, 1000):
        yield b"".join(orjson.dumps({
            "custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "user", "content": f"q {i}"}]},
        }) + b"\n" for i in range(start, min(lines, start + 1000)))


async def soak(engine: str, lines: int, database: str | None, concurrency: int,
               tmp: Path) -> dict[str, object]:
    schema = f"batch_soak_{os.getpid()}" if database else None  # dropped at the end
    config = BatchConfig(
        database_url=database or f"sqlite+aiosqlite:///{tmp}/batch.db", database_schema=schema,
        storage={"url": str(tmp / "files")}, workers=1, poll_interval=0.2,
        initial_concurrency=min(16, concurrency), max_concurrency=concurrency)
    dispatcher = Forward(engine, concurrency)
    service = BatchService(config)
    await service.start(dispatcher)
    file_id = new_id("file-")
    await service.objects.put_stream(Objects.key(file_id), _input(lines))
    await service.add_file(None, {"id": file_id, "purpose": "batch", "filename": "soak.jsonl",
                                  "bytes": 0, "lines": lines, "created_at": service.now(),
                                  "expires_at": None, "status": "processed",
                                  "object_key": Objects.key(file_id)})
    started = time.monotonic()
    batch = await service.create_batch(None, {"input_file_id": file_id, "completion_window": "24h",
                                              "endpoint": "/v1/chat/completions"})
    samples: list[tuple[float, int, int]] = []
    while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
        if time.monotonic() - started > MAX_SECONDS:
            raise TimeoutError(f"batch not done after {MAX_SECONDS}s: {batch['request_counts']}")
        await asyncio.sleep(0.5)
        batch = await service.get_batch(None, batch["id"])
        done = batch["request_counts"]["completed"] + batch["request_counts"]["failed"]
        samples.append((time.monotonic() - started, done, rss_kb(os.getpid())))
    elapsed = time.monotonic() - started
    seen: dict[str, int] = {}
    if batch["output_file_id"]:
        _size, chunks = await service.file_content(None, batch["output_file_id"])
        tail = b""
        async for chunk in chunks:
            *full, tail = (tail + chunk).split(b"\n")
            for raw in full:
                cid = orjson.loads(raw)["custom_id"]
                seen[cid] = seen.get(cid, 0) + 1
    await service.close()
    dispatcher.close()
    if schema:
        engine = create_engine(config)
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await engine.dispose()
    after_warmup = [rss for _t, done, rss in samples if done >= lines * 0.2] or [0]
    growth = max(after_warmup) - after_warmup[0]
    flat = growth <= max(16 * 1024, after_warmup[0] // 10)
    return {
        "lines": lines, "status": batch["status"], "seconds": round(elapsed, 1),
        "lines_per_second": round(lines / elapsed), "request_counts": batch["request_counts"],
        "rss_mib_first_after_warmup": round(after_warmup[0] / 1024, 1),
        "rss_mib_peak_after_warmup": round(max(after_warmup) / 1024, 1),
        "growth_mib": round(growth / 1024, 1), "verdict": "FLAT" if flat else "GROWING",
        "one_line_per_custom_id": len(seen) == lines and set(seen.values()) == {1},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lines", type=int, default=50_000)
    p.add_argument("--database", help="e.g. postgresql+asyncpg://postgres@127.0.0.1/test")
    p.add_argument("--concurrency", type=int, default=32,
                   help="max lines in flight")
    args = p.parse_args(argv)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp, Supervisor(Path(tmp)) as sup:
        engine = sup.start("fast_engine", [sys.executable, "-m", "benchmarks.fast_engine",
                                           "--port", str(port)])
        wait_healthy("127.0.0.1", port, engine.popen, 15)
        report = asyncio.run(soak(f"http://127.0.0.1:{port}", args.lines, args.database,
                                  args.concurrency, Path(tmp)))
    print(json.dumps(report, indent=2))
    return 0 if report["verdict"] == "FLAT" and report["one_line_per_custom_id"] else 1


if __name__ == "__main__":
    sys.exit(main())
