"""router/reload.py: a reload reads the routes file only once it stopped changing."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from router.reload import ConfigHolder, settled
from tests.unit.fleet_core import registry

ROUTES = """\
defaults:
  endpoints: [chat]
models:
  m:
    backends: [{url: "http://a:8000"}]
"""
FIRST_HALF = ROUTES + '  half:\n    backends: [{url: "http://a:8000"}]\n'  # valid on its own
SECOND_HALF = '  tail:\n    backends: [{url: "http://b:8000"}]\n'


async def _holder(tmp_path: Path) -> ConfigHolder:
    path = tmp_path / "routes.yaml"
    path.write_text(ROUTES)
    holder = ConfigHolder(path, registry())
    await holder.load()
    return holder


async def test_a_reload_during_a_paused_write_reads_the_whole_file(tmp_path: Path) -> None:
    """The writer pauses between halves: the reload must not take the valid first half."""
    holder = await _holder(tmp_path)
    with holder.path.open("w") as f:
        f.write(FIRST_HALF)
        f.flush()
        reload = asyncio.create_task(holder.reload())
        await asyncio.sleep(0.04)  # under the settle time (4 polls 50 ms apart)
        f.write(SECOND_HALF)
    assert await reload is True
    assert list(holder.current.models) == ["m", "half", "tail"]
    assert holder.reloads == {"ok": 1, "error": 0, "unchanged": 0}


async def test_a_file_that_keeps_changing_is_not_read(tmp_path: Path) -> None:
    """Past the bounded wait the reload is refused (last good config kept); once the
    writes stop, the next reload reads the file."""
    holder = await _holder(tmp_path)
    holder.settle = (0.02, 2, 0.3)
    old = holder.current
    stop = asyncio.Event()

    async def writer() -> None:
        with holder.path.open("a") as f:
            f.write('  half:\n    backends: [{url: "http://a:8000"}]\n')
            while not stop.is_set():
                f.write("# still writing\n")
                f.flush()
                await asyncio.sleep(0.005)

    task = asyncio.create_task(writer())
    started = time.monotonic()
    try:
        assert await holder.reload() is False
    finally:
        stop.set()
        await task
    assert 0.3 <= time.monotonic() - started < 1.0
    assert holder.current is old and holder.reloads["error"] == 1
    assert holder.last_error is not None and "still being written" in holder.last_error
    assert await holder.reload() is True
    assert list(holder.current.models) == ["m", "half"]


async def test_settled_returns_once_the_files_stop_changing(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("a")
    missing = tmp_path / "gone"  # a missing file is a state like any other

    async def touch() -> None:
        for i in range(6):
            await asyncio.sleep(0.03)
            path.write_text("a" * (i + 2))

    task = asyncio.create_task(touch())
    started = time.monotonic()
    assert await settled([path, missing], step=0.05, polls=2, limit=2.0)
    assert time.monotonic() - started >= 0.18 + 0.1  # the last write, then two quiet polls
    await task
