"""Backends joining and leaving through a routes.yaml rewrite (hot reload)."""

from __future__ import annotations

import random

from tests.fleet.conftest import (
    CHAT,
    Fleet,
    Outcome,
    assert_no_failures,
    chat_body,
    model,
    routes,
    under_load,
)
from tests.harness import Router, wait_until


def test_session_backend_leaving_moves_only_its_sessions(launch_router, fleet: Fleet) -> None:
    def text(engines) -> str:
        return routes({"sessions": model(*engines, policy="session")})

    def placement(router: Router, seed: int) -> dict[str, str]:
        """Session id → the engine that served it (one request per session)."""
        for i in random.Random(seed).sample(range(60), 60):  # a new order each time
            r = router.client.post(CHAT, json=chat_body("sessions"),
                                   headers={"x-session-id": f"session-{i}"})
            assert r.status_code == 200, r.text
        where = {entry["headers"]["x-session-id"]: engine.name
                 for engine in fleet for entry in engine.requests()}
        for engine in fleet:
            engine.reset()
        assert len(where) == 60
        return where

    router = launch_router(text(fleet.engines))
    before = placement(router, 1)
    assert set(before.values()) == {"e0", "e1", "e2"}, before

    router.rewrite(text(fleet.engines[:2]))  # e2 leaves the model
    after = placement(router, 2)
    assert "e2" not in after.values()
    moved = {s for s in before if after[s] != before[s]}
    assert moved == {s for s in before if before[s] == "e2"}, (before, after)

    router.rewrite(text(fleet.engines))  # and comes back: every session returns home
    assert placement(router, 3) == before


async def test_reload_under_load_fails_no_request(launch_router, fleet: Fleet) -> None:
    e0, e1, e2 = fleet.engines
    versions = [
        routes({"fleet": model(e0, e1)}),
        routes({"fleet": model(e1, e0)}),                                    # reorder
        routes({"fleet": model(e1, e0, weights=[3, 1])}),                    # reweigh
        routes({"fleet": model(e1, e0, e2, weights=[3, 1, 1])}),             # add one
        routes({"fleet": model(e1, e2)}),                                    # remove one
        routes({"fleet": model(e2, e1, policy="least_request")}),            # reorder, policy
    ]
    router = launch_router(versions[0])

    def reload_all(outcomes: list[Outcome]) -> None:
        for text in versions[1:]:
            seen = len(outcomes)
            wait_until(lambda seen=seen: len(outcomes) >= seen + 30, 10, "requests flow")
            router.rewrite(text)
        wait_until(lambda: len(outcomes) >= 300, 20, "300 requests")

    # 30 ms per request: every reload finds requests in flight, on removed backends too.
    outcomes = await under_load(reload_all, router.url, "fleet", 300, 8, latency_ms=30)
    assert_no_failures(outcomes, 300)
    reloads = router.admin()["reloads"]
    assert (reloads["ok"], reloads["error"]) == (5, 0), reloads

    # The last version is the one serving: e0 gets nothing, e1 and e2 share the load.
    for engine in fleet:
        engine.reset()
    for _ in range(30):
        assert router.client.post(CHAT, json=chat_body("fleet")).status_code == 200
    counts = fleet.counts()
    assert counts[0] == 0 and counts[1] > 0 and counts[2] > 0, counts
