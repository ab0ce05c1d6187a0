"""Outlier detection that cannot be turned against a model: the ejection cap, panic mode,
500 answers that weigh less than gateway failures, and recovery as soon as checks pass."""

from __future__ import annotations

import time

import httpx

from tests.fleet.conftest import CHAT, Engine, Fleet, chat_body, model, routes
from tests.harness import Router, wait_until

#: The production cool-down: no test here may pass by waiting one out.
LONG = "30s"


def inject(engine: Engine, **spec: object) -> None:
    r = httpx.post(f"{engine.url}/_fake/inject", json={"paths": [CHAT], **spec}, timeout=10)
    r.raise_for_status()


def entry(router: Router, name: str, engine: Engine) -> dict:
    (found,) = [b for b in router.backends(name) if b["url"] == engine.url]
    return found


def test_requests_answered_500_never_eject_a_models_only_backend(launch_router,
                                                                   fleet: Fleet) -> None:
    """Any client can make vLLM answer 500 (a body it fails on): twenty of them in a row
    must not take a one-backend model out for everyone."""
    only = fleet[0]
    router = launch_router(routes({"solo": model(only)},
                                  outlier_detection={"ejection": LONG}))
    inject(only, status=500, count=20)
    statuses = [router.client.post(CHAT, json=chat_body("solo")).status_code
                for _ in range(20)]
    assert statuses == [500] * 20  # the engine's own answers, passed through
    r = router.client.post(CHAT, json=chat_body("solo"))
    assert r.status_code == 200, r.text
    assert entry(router, "solo", only)["state"] == "healthy"


def test_500_answers_weigh_less_than_gateway_failures(launch_router, fleet: Fleet) -> None:
    """Ten 500s in a row (under ``consecutive_5xx``, over ``consecutive_failures``) leave a
    backend in; three 502s in a row (``consecutive_failures``) eject it."""
    suspect, other = fleet[0], fleet[1]
    router = launch_router(routes({"pair": model(suspect, other)},
                                  health_checks={"enabled": False},
                                  outlier_detection={"consecutive_failures": 3,
                                                     "ejection": LONG}))
    inject(suspect, status=500, count=10)
    statuses = [router.client.post(CHAT, json=chat_body("pair")).status_code
                for _ in range(20)]
    assert sorted(statuses) == [200] * 10 + [500] * 10
    state = entry(router, "pair", suspect)
    assert state["state"] == "healthy", state
    assert (state["consecutive_failures"], state["consecutive_5xx"]) == (0, 10)

    inject(suspect, status=502, count=3)
    sent = 0
    while (state := entry(router, "pair", suspect))["state"] != "ejected":
        sent += 1
        assert sent <= 10, state
        r = router.client.post(CHAT, json=chat_body("pair"))
        assert r.status_code == 200, r.text  # a 502 is retried on the other backend
    assert suspect.count() == 13  # ten 500s, three 502s
    for _ in range(4):
        assert router.client.post(CHAT, json=chat_body("pair")).status_code == 200
    assert suspect.count() == 13  # ejected: no traffic (checks are off here)


def test_every_backend_ejected_still_gets_traffic_in_panic_mode(launch_router,
                                                                 fleet: Fleet) -> None:
    """``max_ejection_percent: 100`` lets outlier detection eject every backend; panic mode
    (under ``panic_threshold`` of them up) routes to them anyway instead of answering 503."""
    pair = [fleet[0], fleet[1]]
    router = launch_router(routes({"pair": model(*pair)},
                                  health_checks={"enabled": False},
                                  outlier_detection={"consecutive_failures": 3,
                                                     "ejection": LONG,
                                                     "max_ejection_percent": 100}))
    for engine in pair:
        inject(engine, status=502)
    sent = 0
    while any(entry(router, "pair", e)["state"] != "ejected" for e in pair):
        sent += 1
        assert sent <= 10, [entry(router, "pair", e) for e in pair]
        assert router.client.post(CHAT, json=chat_body("pair")).status_code == 502
    for engine in pair:
        engine.reset()  # the engines are fine again; the ejections run for 30 s
    for _ in range(4):
        r = router.client.post(CHAT, json=chat_body("pair"))
        assert r.status_code == 200, r.text
    for engine in pair:
        state = entry(router, "pair", engine)
        assert (state["state"], state["up"]) == ("ejected", True), state
    assert all(e.count() >= 1 for e in pair)


def test_traffic_resumes_within_a_few_check_intervals_after_a_full_outage(
        launch_router, fleet: Fleet) -> None:
    """The fleet's checks run every 200 ms: traffic is back within a few of them (typically
    the first), not after the ejection cool-down."""
    router = launch_router(routes({"fleet": model(*fleet)},
                                  outlier_detection={"ejection": LONG}))

    def status() -> int:
        return router.client.post(CHAT, json=chat_body("fleet")).status_code

    for engine in fleet:
        engine.kill()
    # Traffic fails at every backend (outlier detection ejects what it may) before the
    # checks take them all out: 503.
    wait_until(lambda: status() == 503, 5, "503 from the router")
    for _ in range(5):
        assert status() == 503
    states = [entry(router, "fleet", e)["state"] for e in fleet]
    assert "ejected" in states, states
    for engine in fleet:
        engine.launch()
    back = wait_until(lambda: any(answers_health(e) for e in fleet) and time.monotonic(),
                      30, "an engine answers /health", interval=0.005)
    wait_until(lambda: status() == 200, 10, "200 again", interval=0.005)
    elapsed = time.monotonic() - back
    for engine in fleet:
        engine.wait_ready()
    print(f"\nfull outage: first 200 {elapsed * 1000:.0f} ms after an engine answered /health")
    assert elapsed < 2.0, elapsed  # the tree before waited out the cool-down: 29 s


def answers_health(engine: Engine) -> bool:
    try:
        return httpx.get(f"{engine.url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
