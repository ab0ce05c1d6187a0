"""A slow in-place writer of routes.yaml: the router never serves the half it could see.

The writer truncates the file, writes a first half that is a valid config on its own,
pauses (longer than the watcher's quiet time, shorter than the reload's settle time) and
writes the rest. A model only in the second half was served before and must stay served
throughout: no 404 for it, and the half's sha256 never loaded.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx

from tests.conftest import routes_yaml
from tests.harness import sha256


def _model(engines: dict, name: str) -> str:
    return (f"  {name}:\n    backends:\n      - url: {engines['generate']}\n"
            "    endpoints: [chat, tokenize]\n    backend_model: chat-model\n")


def test_a_file_written_in_two_halves_is_never_served_half(engines: dict,
                                                            launch_router) -> None:
    base, tail = routes_yaml(engines), _model(engines, "tail-model")
    router = launch_router(base + tail)
    stop = threading.Event()
    statuses: Counter[int] = Counter()

    def ask_for_the_tail_model() -> None:
        with httpx.Client(base_url=router.url, timeout=10) as client:
            while not stop.is_set():
                r = client.post("/tokenize", json={"model": "tail-model", "prompt": "a"})
                statuses[r.status_code] += 1

    asking = threading.Thread(target=ask_for_the_tail_model)
    asking.start()
    halves = []
    try:
        for i in range(4):
            first = base + _model(engines, f"changed-{i}")
            halves.append(sha256(first))
            with router.config.open("w") as f:
                f.write(first)
                f.flush()
                time.sleep(0.12)
                f.write(tail)
            router.wait_for_sha(sha256(first + tail), 5)
            time.sleep(0.3)  # the watcher's follow-up event, an unchanged reload
    finally:
        stop.set()
        asking.join()
    log = router.log_text()
    assert [h[:12] for h in halves if f"sha256 {h[:12]}" in log] == []
    assert statuses[404] == 0 and statuses[200] > 0, statuses
    assert router.admin()["reloads"]["ok"] == 4
