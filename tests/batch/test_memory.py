"""Uploads and downloads stream: the server's memory stays flat for a 200 MB file."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

from tests.batch.conftest import Server, chat_line, jsonl

SIZE = 200 * 1000 * 1000


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class PeakRss:
    """Samples a process's RSS every 20 ms while the block runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_kb(self.pid))
            time.sleep(0.02)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_200_mb_upload_and_download_keep_memory_flat(local_server: Server,
                                                     tmp_path: Path) -> None:
    block = jsonl([chat_line(f"mem-{i}") for i in range(8000)])
    path = tmp_path / "big.jsonl"
    digest = hashlib.sha256()
    with path.open("wb") as f:
        written = 0
        while written < SIZE:
            f.write(block)
            digest.update(block)
            written += len(block)
    http = local_server.http()
    http.get("/v1/files")  # warm up the worker before the baseline
    baseline = rss_kb(local_server.pid)
    with PeakRss(local_server.pid) as up, path.open("rb") as f:
        made = http.post("/v1/files", files={"file": ("big.jsonl", f)},
                         data={"purpose": "user_data"}, timeout=120)
    assert made.status_code == 200, made.text
    assert made.json()["bytes"] == written
    got = hashlib.sha256()
    size = 0
    with PeakRss(local_server.pid) as down, http.stream(
            "GET", f"/v1/files/{made.json()['id']}/content", timeout=120) as response:
        assert response.headers["content-length"] == str(written)
        for chunk in response.iter_bytes():
            got.update(chunk)
            size += len(chunk)
    assert size == written and got.hexdigest() == digest.hexdigest()
    growth_mb = (max(up.peak, down.peak) - baseline) / 1024
    assert growth_mb < 60, f"server RSS grew {growth_mb:.0f} MB for a {SIZE // 10**6} MB file"
    http.delete(f"/v1/files/{made.json()['id']}")
