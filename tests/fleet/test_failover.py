"""Backends that die, hang or flap under load: what clients see, and what the router does."""

from __future__ import annotations

import asyncio
import itertools

import httpx

from tests.fleet.conftest import (
    CHAT,
    Fleet,
    Outcome,
    assert_no_failures,
    chat_body,
    hammer,
    model,
    routes,
    under_load,
)
from tests.harness import eventually, wait_until


async def test_killing_one_of_three_backends_loses_no_request(launch_router, fleet: Fleet) -> None:
    router = launch_router(routes({"fleet": model(*fleet)},
                                  outlier_detection={"consecutive_failures": 3, "ejection": "30s"}))
    victim = fleet[2]
    total, concurrency, kill_after = 500, 16, 120
    outcomes: list[Outcome] = []
    at_kill: dict[str, int] = {}

    async def kill_when_busy() -> None:
        await eventually(lambda: len(outcomes) >= kill_after, 30, f"{kill_after} answers",
                         interval=0.005)
        at_kill["answered"] = len(outcomes)
        at_kill["victim"] = await asyncio.to_thread(victim.count)
        await asyncio.to_thread(victim.kill)  # SIGKILL with requests in flight on it

    # 20 ms per request keeps about five in flight on each engine.
    _, outcomes = await asyncio.gather(
        kill_when_busy(),
        hammer(router.url, "fleet", total, concurrency, done=outcomes,
               headers={"x-fake-latency-ms": "20"}))
    assert_no_failures(outcomes, total)
    assert len(outcomes) == total
    assert at_kill["victim"] > 0 and at_kill["answered"] <= total / 2, at_kill
    wait_until(lambda: router.backend_state("fleet", victim.url) in ("unhealthy", "ejected"), 2,
               "the killed backend is out")


def test_a_hanging_backend_times_out_is_ejected_then_probed_back(launch_router,
                                                                  fleet: Fleet) -> None:
    """Active checks are off here, so only outlier detection and its probe decide."""
    hung = fleet.hung
    hung.restore()  # --latency-ms 60000: its /health answers, its inference never does
    router = launch_router(routes(
        {"fleet": model(fleet[0], fleet[1], hung, timeouts={"first_byte": "300ms"})},
        health_checks={"enabled": False},
        outlier_detection={"consecutive_failures": 2, "ejection": "3s"}))

    def entry() -> dict:
        (found,) = [b for b in router.backends("fleet") if b["url"] == hung.url]
        return found

    answers = []
    while entry()["state"] != "ejected":
        assert len(answers) < 12, [r.status_code for r in answers]
        answers.append(router.client.post(CHAT, json=chat_body("fleet")))
    failed = [r for r in answers if r.status_code != 200]
    assert len(failed) == 2, [r.status_code for r in answers]
    for r in failed:
        assert r.status_code == 504
        assert r.json()["error"]["code"] == "backend_timeout"
    assert hung.count() == 2

    # Ejected: every request succeeds and none goes to it.
    for _ in range(30):
        r = router.client.post(CHAT, json=chat_body("fleet"))
        assert r.status_code == 200, r.text
    assert hung.count() == 2
    assert entry()["state"] == "ejected"

    # Down at the end of the cool-down: the probe fails and it stays out.
    hung.kill()
    probed = wait_until(lambda: (e := entry())["last_error"].startswith("health check") and e,
                        8, "the probe at the end of the cool-down ran")
    assert probed["state"] == "ejected"

    # Healthy again on the same port: the next probe lets it back in.
    hung.start(latency_ms=0)
    wait_until(lambda: entry()["state"] == "healthy", 10, "the backend is back")
    for _ in range(30):
        r = router.client.post(CHAT, json=chat_body("fleet"))
        assert r.status_code == 200, r.text
    assert hung.count() >= 8


async def test_a_flapping_backend_costs_no_request(launch_router, fleet: Fleet) -> None:
    outlier = {"consecutive_failures": 2, "ejection": "500ms"}
    router = launch_router(routes({"fleet": model(*fleet)}, outlier_detection=outlier))
    flapper = fleet[2]
    watching = asyncio.Event()
    states: list[str] = []

    async def watch() -> None:
        async with httpx.AsyncClient(base_url=router.url, timeout=10) as client:
            while not watching.is_set():
                entries = (await client.get("/admin/backends")).json()["fleet"]["backends"]
                (state,) = [b["state"] for b in entries if b["url"] == flapper.url]
                if not states or states[-1] != state:
                    states.append(state)
                await asyncio.sleep(0.02)

    def state() -> str:
        return router.backend_state("fleet", flapper.url)

    def flap(_outcomes: list[Outcome]) -> None:
        for how in ("kill", "stop", "kill"):
            wait_until(flapper.count, 5, "the backend takes traffic")
            getattr(flapper, how)()
            # Down until the router has seen it go (failed requests or health checks).
            wait_until(lambda: state() != "healthy", 5, "the router takes the backend out")
            flapper.start()
            wait_until(lambda: state() == "healthy", 10, "the backend is healthy again")
        wait_until(flapper.count, 5, "the backend takes traffic")

    watcher = asyncio.create_task(watch())
    try:
        outcomes = await under_load(flap, router.url, "fleet", 300, 6, latency_ms=40)
    finally:
        watching.set()
        await watcher
    assert_no_failures(outcomes, 300)
    downs = sum(1 for a, b in itertools.pairwise(states)
                if a == "healthy" and b != "healthy")
    assert downs >= 3, states
    assert states[-1] == "healthy", states
