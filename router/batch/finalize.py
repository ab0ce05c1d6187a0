"""Turn a batch's checkpoint into its output and error files, streaming.

Output: the successful lines, in input order. Errors: the failed lines and, for a
cancelled or expired batch, one ``batch_cancelled``/``batch_expired`` line per request
that never ran, so every input ``custom_id`` appears exactly once across the two files.
File ids are derived from the batch id; a finalization interrupted by a crash is redone
over the same objects and rows.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator
from typing import Any

import orjson

from router.batch.db import MetaStore
from router.batch.jsonl import iter_lines
from router.batch.models import error_line, output_file_id
from router.batch.objects import Objects
from router.batch.schema import AnyRow

FLUSH_BYTES = 1024 * 1024
UNRUN = {
    "cancelled": ("batch_cancelled", "The batch was cancelled before this request was sent."),
    "expired": ("batch_expired",
                "This request could not be executed before the completion window expired."),
}


class _Counted:
    """Lines to ~1 MiB chunks for the upload, counting bytes and lines on the way."""

    def __init__(self, lines: AsyncIterable[bytes]) -> None:
        self.lines = lines
        self.bytes = 0
        self.count = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        buffer = bytearray()
        async for line in self.lines:
            buffer += line
            buffer += b"\n"
            self.count += 1
            if len(buffer) >= FLUSH_BYTES:
                self.bytes += len(buffer)
                yield bytes(buffer)
                buffer.clear()
        if buffer:
            self.bytes += len(buffer)
            yield bytes(buffer)


async def _successes(db: MetaStore, batch_id: str) -> AsyncGenerator[bytes, None]:
    async for _line, _ok, data in db.iter_results(batch_id, ok=True):
        yield data


async def _failures(db: MetaStore, objects: Objects, row: AnyRow, outcome: str,
                    max_line: int) -> AsyncGenerator[bytes, None]:
    if outcome not in UNRUN:
        async for _line, _ok, data in db.iter_results(row.id, ok=False):
            yield data
        return
    code, message = UNRUN[outcome]
    results = db.iter_results(row.id).__aiter__()
    current = await anext(results, None)
    source = objects.read(Objects.key(row.input_file_id))
    async for number, raw in iter_lines(source, max_line):
        if not raw.strip():
            continue
        while current is not None and current[0] < number:
            current = await anext(results, None)
        if current is not None and current[0] == number:
            if not current[1]:
                yield current[2]
            continue
        yield error_line(orjson.loads(raw)["custom_id"], code, message)


async def write_outputs(db: MetaStore, objects: Objects, row: AnyRow, outcome: str, now: int,
                        max_line: int) -> list[dict[str, Any]]:
    """Store the non-empty output/error files; their ``batch_files`` rows to insert."""
    unrun = row.total - row.completed - row.failed if outcome in UNRUN else 0
    expires_at = now + row.output_expires_after if row.output_expires_after else None
    made = []
    plan: list[tuple[str, int, AsyncGenerator[bytes, None]]] = [
        ("output", row.completed, _successes(db, row.id)),
        ("error", row.failed + unrun, _failures(db, objects, row, outcome, max_line)),
    ]
    for kind, expected, lines in plan:
        if expected <= 0:
            await lines.aclose()
            continue
        file_id = output_file_id(row.id, kind)
        counted = _Counted(lines)
        await objects.put_stream(Objects.key(file_id), counted)
        made.append({
            "id": file_id, "tenant": row.tenant, "purpose": "batch_output",
            "filename": f"{row.id}_{kind}.jsonl", "bytes": counted.bytes,
            "lines": counted.count, "created_at": now, "expires_at": expires_at,
            "status": "processed", "object_key": Objects.key(file_id), "purpose_kind": kind,
        })
    return made
