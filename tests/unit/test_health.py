"""router/health.py: the state machine on a fake clock, and the checker over MockTransport."""

from __future__ import annotations

import asyncio
import logging

import pytest

import router.health as health_module
from router.config import HealthChecks, OutlierDetection
from router.endpoint import Endpoint
from router.errors import BackendUnavailable
from router.health import EJECTED, HEALTHY, UNHEALTHY, Health, HealthBoard, HealthChecker, probe
from router.isotime import iso
from router.upstream_mock import MockReply, MockRequest, MockTransport
from tests.unit.fleet_core import FakeClock, Transitions, eventually, registry

OUTLIER = OutlierDetection(consecutive_failures=3, ejection=30)
#: Ejections that only their cool-down's probe ends (checks do not).
STICKY = OutlierDetection(consecutive_failures=3, ejection=30, uneject_on_health_check=False)
CHECKS = HealthChecks(unhealthy_threshold=2, healthy_threshold=2)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """router.health's clock (the event loop keeps the real one)."""
    fake = FakeClock()
    monkeypatch.setattr(health_module, "time", fake)
    return fake


def machine() -> tuple[Health, Transitions]:
    board = HealthBoard()
    return Health("http://e0:8000", board), Transitions(board)


# -- passive: request failures ------------------------------------------------------------
def test_consecutive_failures_eject_at_the_threshold_and_notify_once(clock: FakeClock) -> None:
    health, seen = machine()
    health.request_failed("status 502", OUTLIER)
    health.request_failed("status 502", OUTLIER)
    assert health.up and health.state == HEALTHY and seen.seen == []
    health.request_failed("connection refused", OUTLIER)
    assert not health.up and health.ejected and health.state == EJECTED
    assert health.ejected_until == clock.now + 30
    assert seen.seen == [("http://e0:8000", HEALTHY, EJECTED)]
    assert health.last_error == "connection refused"
    clock.advance(10)
    health.request_failed("status 503", OUTLIER)  # in flight when it was ejected
    assert seen.seen == [("http://e0:8000", HEALTHY, EJECTED)]  # still once
    assert health.ejected_until == clock.now + 20  # the cool-down is not extended


def test_a_success_resets_the_failure_count(clock: FakeClock) -> None:
    health, seen = machine()
    for _ in range(3):
        health.request_failed("status 502", OUTLIER)
        health.request_failed("status 502", OUTLIER)
        health.request_succeeded()
        assert health.consecutive_failures == 0
    assert health.up and seen.seen == []
    for _ in range(3):
        health.request_failed("status 502", OUTLIER)
    assert health.state == EJECTED


def test_a_500_counts_toward_consecutive_5xx_only(clock: FakeClock) -> None:
    """A client can make an engine answer 500: it weighs less than a gateway failure."""
    health, seen = machine()
    outlier = OutlierDetection(consecutive_failures=3, consecutive_5xx=6, ejection=30)
    for _ in range(2):
        health.request_failed("status 502", outlier, 502)
    health.request_failed("status 500", outlier, 500)  # resets the gateway streak
    assert (health.consecutive_failures, health.consecutive_5xx) == (0, 3)
    health.request_failed("status 503", outlier, 503)
    health.request_failed("status 500", outlier, 500)
    assert health.up and seen.seen == []  # five failures, never three gateway ones in a row
    health.request_failed("status 500", outlier, 500)
    assert health.state == EJECTED and health.consecutive_5xx == 6
    assert seen.seen == [("http://e0:8000", HEALTHY, EJECTED)]


def test_gateway_failures_count_toward_both_streaks(clock: FakeClock) -> None:
    health, _ = machine()
    outlier = OutlierDetection(consecutive_failures=3, consecutive_5xx=20, ejection=30)
    health.request_failed("connection refused", outlier)  # no answer: a gateway failure
    health.request_failed("status 504", outlier, 504)
    assert (health.consecutive_failures, health.consecutive_5xx) == (2, 2)
    health.request_failed("status 502", outlier, 502)
    assert health.ejected
    health.request_succeeded()
    assert (health.consecutive_failures, health.consecutive_5xx) == (0, 0)


def test_the_defaults_take_twenty_500s_but_five_gateway_failures(clock: FakeClock) -> None:
    defaults = OutlierDetection()
    assert (defaults.consecutive_failures, defaults.consecutive_5xx) == (5, 20)
    assert (defaults.max_ejection_percent, defaults.panic_threshold) == (50, 50)
    assert defaults.uneject_on_health_check
    by_500, _ = machine()
    for _ in range(19):
        by_500.request_failed("status 500", defaults, 500)
    assert by_500.up
    by_500.request_failed("status 500", defaults, 500)
    assert by_500.ejected
    by_502, _ = machine()
    for _ in range(5):
        by_502.request_failed("status 502", defaults, 502)
    assert by_502.ejected


def test_a_refused_ejection_keeps_the_streak_and_ejects_once_allowed(
        clock: FakeClock) -> None:
    health, seen = machine()
    allowed = False
    asked: list[int] = []

    def may_eject() -> bool:
        asked.append(health.consecutive_failures)
        return allowed

    for _ in range(4):
        health.request_failed("status 502", OUTLIER, 502, may_eject)
    assert health.up and seen.seen == [] and asked == [3, 4]
    allowed = True
    health.request_failed("status 502", OUTLIER, 502, may_eject)
    assert health.state == EJECTED and asked == [3, 4, 5]
    assert health.ejected_at == clock.now and health.ejected_until == clock.now + 30


def test_a_waived_ejection_is_up_and_still_ejected(clock: FakeClock) -> None:
    health, seen = machine()
    for _ in range(3):
        health.request_failed("status 502", OUTLIER)
    assert health.waive(True) is True  # panic mode: up again
    assert (health.state, health.ejected, health.up) == (EJECTED, True, True)
    assert not health.in_rotation  # what caps and panic mode count
    assert health.waive(True) is False  # already up
    assert health.waive(False) is False and not health.up
    health.waive(True)
    for _ in range(2):
        health.checked("health check: down", CHECKS, STICKY)
    assert not health.up  # a waiver never brings back an endpoint failing its checks
    assert seen.seen == [("http://e0:8000", HEALTHY, EJECTED)]


# -- active checks: hysteresis ------------------------------------------------------------
def test_unhealthy_after_unhealthy_threshold_failures(clock: FakeClock) -> None:
    health, seen = machine()
    health.checked("health check: status 500", CHECKS, OUTLIER)
    assert health.up and seen.seen == []  # one lost probe does not flap it
    assert health.last_check == clock.time()
    health.checked(None, CHECKS, OUTLIER)  # a success in between resets the count
    health.checked("health check: status 500", CHECKS, OUTLIER)
    assert health.up
    health.checked("health check: timeout", CHECKS, OUTLIER)
    assert not health.up and not health.healthy and health.state == UNHEALTHY
    assert seen.seen == [("http://e0:8000", HEALTHY, UNHEALTHY)]
    assert health.last_error == "health check: timeout"
    health.checked("health check: timeout", CHECKS, OUTLIER)
    assert len(seen.seen) == 1


def test_healthy_again_after_healthy_threshold_successes(clock: FakeClock) -> None:
    health, seen = machine()
    for _ in range(2):
        health.checked("down", CHECKS, OUTLIER)
    health.checked(None, CHECKS, OUTLIER)
    assert not health.up  # one success is not enough with healthy_threshold 2
    health.checked("down", CHECKS, OUTLIER)
    health.checked(None, CHECKS, OUTLIER)
    assert not health.up  # the failure restarted the count
    health.checked(None, CHECKS, OUTLIER)
    assert health.up and health.state == HEALTHY
    assert seen.seen == [("http://e0:8000", HEALTHY, UNHEALTHY),
                         ("http://e0:8000", UNHEALTHY, HEALTHY)]


def test_up_needs_both_healthy_and_not_ejected(clock: FakeClock) -> None:
    health, seen = machine()
    for _ in range(3):
        health.request_failed("status 502", OUTLIER)
    for _ in range(2):
        health.checked("down", CHECKS, OUTLIER)  # unhealthy as well, within the cool-down
    assert (health.healthy, health.ejected, health.up) == (False, True, False)
    assert health.state == EJECTED
    clock.advance(31)
    health.probed(None, OUTLIER)  # the ejection ends, the checks still fail it
    assert (health.healthy, health.ejected, health.up) == (False, False, False)
    assert health.state == UNHEALTHY
    for _ in range(2):
        health.checked(None, CHECKS, OUTLIER)
    assert health.up
    assert [after for _, _, after in seen.seen] == [EJECTED, UNHEALTHY, HEALTHY]


# -- the ejection probe -------------------------------------------------------------------
def test_a_passing_probe_ends_the_ejection(clock: FakeClock) -> None:
    health, seen = machine()
    for _ in range(3):
        health.request_failed("status 502", OUTLIER)
    clock.advance(30)
    health.probed(None, OUTLIER)
    assert health.up and health.consecutive_failures == 0
    assert seen.seen[-1] == ("http://e0:8000", EJECTED, HEALTHY)
    health.request_failed("status 502", OUTLIER)
    assert health.up  # the count starts over


def test_a_failing_probe_extends_the_ejection(clock: FakeClock) -> None:
    health, seen = machine()
    for _ in range(3):
        health.request_failed("status 502", OUTLIER)
    clock.advance(30)
    health.probed("health check: status 500", OUTLIER)
    assert health.ejected and health.ejected_until == clock.now + 30
    assert health.last_error == "health check: status 500"
    assert len(seen.seen) == 1
    health.probed(None, OUTLIER)
    assert health.up


def test_probed_when_not_ejected_changes_nothing(clock: FakeClock) -> None:
    health, seen = machine()
    health.probed("late answer", OUTLIER)
    assert health.up and health.last_error is None and seen.seen == []


def test_an_active_check_past_the_cool_down_is_the_probe(clock: FakeClock) -> None:
    health, _ = machine()
    for _ in range(3):
        health.request_failed("status 502", STICKY)
    health.checked(None, CHECKS, STICKY)
    assert health.ejected  # within the cool-down, checks do not end it (STICKY)
    clock.advance(30)
    health.checked("health check: status 500", CHECKS, STICKY)
    assert health.ejected and health.ejected_until == clock.now + 30
    clock.advance(30)
    health.checked(None, CHECKS, STICKY)
    assert health.up


def test_a_passing_active_check_ends_an_ejection_at_once(clock: FakeClock) -> None:
    health, seen = machine()
    for _ in range(3):
        health.request_failed("status 502", OUTLIER)
    clock.advance(1)
    health.checked(None, CHECKS, OUTLIER, started=clock.now - 0.5)
    assert health.up and health.state == HEALTHY  # 29 s of cool-down left: not waited out
    assert (health.consecutive_failures, health.consecutive_5xx) == (0, 0)
    assert seen.seen == [("http://e0:8000", HEALTHY, EJECTED),
                         ("http://e0:8000", EJECTED, HEALTHY)]


def test_a_check_started_before_the_ejection_does_not_end_it(clock: FakeClock) -> None:
    health, _ = machine()
    started = clock.now
    clock.advance(0.1)
    for _ in range(3):
        health.request_failed("status 502", OUTLIER)  # while that check was in flight
    health.checked(None, CHECKS, OUTLIER, started=started)
    assert health.ejected
    health.checked(None, CHECKS, OUTLIER, started=clock.now)
    assert health.up


def test_after_an_outage_healthy_threshold_passes_bring_it_back(clock: FakeClock) -> None:
    """Ejected by failed requests and unhealthy by checks: the first passing check ends the
    ejection, ``healthy_threshold`` passes the rest; no cool-down is waited out."""
    health, seen = machine()
    for _ in range(3):
        health.request_failed("connection refused", OUTLIER)
    for _ in range(2):
        health.checked("health check: connection refused", CHECKS, OUTLIER)
    assert (health.healthy, health.ejected) == (False, True)
    health.checked(None, CHECKS, OUTLIER)
    assert (health.state, health.up) == (UNHEALTHY, False)  # healthy_threshold is 2
    health.checked(None, CHECKS, OUTLIER)
    assert health.up and clock.now == 1000.0
    assert [after for _, _, after in seen.seen] == [EJECTED, UNHEALTHY, HEALTHY]


def test_describe(clock: FakeClock) -> None:
    health, _ = machine()
    health.checked("health check: status 500", CHECKS, OUTLIER)
    assert health.describe() == {"state": HEALTHY, "up": True, "consecutive_failures": 0,
                                 "consecutive_5xx": 0,
                                 "last_error": "health check: status 500",
                                 "last_check": iso(clock.time())}
    assert health.describe()["last_check"] == "2023-11-14T22:30:00.000Z"


def streak(health: Health) -> tuple[int, int, str | None]:
    return health.consecutive_failures, health.consecutive_5xx, health.last_error


def test_the_end_of_an_ejection_clears_the_streak_and_its_reason(clock: FakeClock) -> None:
    health, _ = machine()
    for _ in range(3):
        health.request_failed("connection refused", OUTLIER)
    assert health.ejected and streak(health) == (3, 3, "connection refused")
    health.checked(None, CHECKS, OUTLIER)  # uneject_on_health_check
    assert health.state == HEALTHY and streak(health) == (0, 0, None)
    # Or by the cool-down's probe.
    for _ in range(3):
        health.request_failed("status 502", STICKY, 502)
    clock.advance(31)
    health.probed(None, STICKY)
    assert health.state == HEALTHY and streak(health) == (0, 0, None)


def test_healthy_again_after_failed_checks_clears_the_reason(clock: FakeClock) -> None:
    health, _ = machine()
    health.request_failed("status 502", OUTLIER, 502)
    for _ in range(2):
        health.checked("health check: status 500", CHECKS, OUTLIER)
    assert health.state == UNHEALTHY and health.last_error == "health check: status 500"
    health.checked(None, CHECKS, OUTLIER)
    assert health.state == UNHEALTHY and health.last_error == "health check: status 500"
    health.checked(None, CHECKS, OUTLIER)  # healthy_threshold 2
    assert health.state == HEALTHY and streak(health) == (0, 0, None)


def test_a_streak_that_ends_without_a_transition_clears_its_reason(clock: FakeClock) -> None:
    health, _ = machine()
    health.request_failed("connection reset", OUTLIER)
    assert streak(health) == (1, 1, "connection reset")
    health.request_succeeded()
    assert streak(health) == (0, 0, None)
    health.checked("health check: status 500", CHECKS, OUTLIER)  # one, under the threshold
    health.checked(None, CHECKS, OUTLIER)
    assert health.last_error is None
    # A passing check says nothing about requests failing meanwhile.
    health.request_failed("status 502", OUTLIER, 502)
    health.checked(None, CHECKS, OUTLIER)
    assert streak(health) == (1, 1, "status 502")


def test_going_down_logs_a_warning_and_coming_back_info(
        clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    health, _ = machine()
    caplog.set_level(logging.INFO, "routeyard.health")
    for _ in range(3):
        health.request_failed("connection refused", OUTLIER)
    health.checked(None, CHECKS, OUTLIER)
    for _ in range(2):
        health.checked("health check: status 500", CHECKS, OUTLIER)
    for _ in range(2):
        health.checked(None, CHECKS, OUTLIER)
    logged = [(r.levelno, r.getMessage().split(" for ")[0].split(" (")[0])
              for r in caplog.records if r.name == "routeyard.health"]
    assert logged == [
        (logging.WARNING, "backend http://e0:8000 ejected"),
        (logging.INFO, "backend http://e0:8000 is back after its ejection"),
        (logging.WARNING, "backend http://e0:8000 is now unhealthy"),
        (logging.INFO, "backend http://e0:8000 is healthy again"),
    ]


# -- probe() and HealthChecker over MockTransport -----------------------------------------
class Backend:
    """A scripted backend: answers ``status``, or raises ``error``; ``failures`` health
    checks fail with 500 before it answers ``status`` again."""

    def __init__(self) -> None:
        self.status = 200
        self.failures = 0
        self.error: Exception | None = None
        self.delay = 0.0
        self.checks: list[str] = []

    def __call__(self, request: MockRequest) -> MockReply | asyncio.Future[MockReply]:
        self.checks.append(request.target)
        if self.error is not None:
            raise self.error
        status = self.status
        if self.failures:
            self.failures -= 1
            status = 500
        reply = MockReply(status, [(b"content-type", b"text/plain")], [b"ok"])
        if self.delay:
            return asyncio.ensure_future(self._later(reply))
        return reply

    async def _later(self, reply: MockReply) -> MockReply:
        await asyncio.sleep(self.delay)
        return reply


def endpoint(backend: Backend, board: HealthBoard | None = None,
             url: str = "http://e0:8000/prefix") -> Endpoint:
    return registry(backend, board).get(url)


async def test_probe_passes_on_200_and_sends_a_plain_get() -> None:
    backend = Backend()
    ep = endpoint(backend)
    assert await probe(ep, "/health", 1.0) is None
    (request,) = ep.transport.requests  # type: ignore[attr-defined]
    assert (request.method, request.target) == ("GET", "/prefix/health")
    assert request.header("host") == "e0:8000"
    assert request.header("user-agent") == "routeyard-health"


async def test_probe_fails_on_500_and_on_a_transport_error() -> None:
    backend = Backend()
    ep = endpoint(backend)
    backend.status = 500
    assert await probe(ep, "/health", 1.0) == "health check: status 500"
    backend.error = BackendUnavailable("connection refused")
    assert await probe(ep, "/health", 1.0) == "health check: connection refused"


async def test_probe_fails_on_a_timeout() -> None:
    backend = Backend()
    backend.delay = 1.0
    error = await probe(endpoint(backend), "/health", 0.02)
    assert error is not None and error.startswith("health check: ")


def checker_for(backends: list[Backend], checks: HealthChecks,
                outlier: OutlierDetection) -> tuple[HealthChecker, list[Endpoint]]:
    board = HealthBoard()
    handlers = iter(backends)
    reg = registry(board=board)
    reg.transports = lambda origin: MockTransport(next(handlers))
    eps = [reg.get(f"http://e{i}:8000") for i in range(len(backends))]
    checker = HealthChecker(board, lambda: list(reg.by_key.values()),
                            lambda: (checks, outlier))
    return checker, eps


async def test_checker_records_the_reason_in_last_error() -> None:
    ok, failing, broken = Backend(), Backend(), Backend()
    failing.status = 500
    broken.error = BackendUnavailable("connection reset")
    checks = HealthChecks(unhealthy_threshold=1, timeout=0.5)
    checker, (e_ok, e_failing, e_broken) = checker_for([ok, failing, broken], checks, OUTLIER)
    for ep in (e_ok, e_failing, e_broken):
        await checker.check(ep)
    assert e_ok.up and e_ok.health.last_error is None and e_ok.health.last_check is not None
    assert not e_failing.up and e_failing.health.last_error == "health check: status 500"
    assert not e_broken.up
    assert e_broken.health.last_error == "health check: connection reset"
    assert ok.checks == failing.checks == broken.checks == ["/health"]


async def test_checker_run_marks_unhealthy_then_healthy_again() -> None:
    a, b = Backend(), Backend()
    b.status = 503
    checks = HealthChecks(interval=0.005, timeout=0.5, unhealthy_threshold=2,
                          healthy_threshold=2)
    checker, (ea, eb) = checker_for([a, b], checks, OUTLIER)
    task = asyncio.get_running_loop().create_task(checker.run())
    try:
        await eventually(lambda: not eb.up, what="b unhealthy")
        assert len(b.checks) >= 2 and ea.up
        b.status = 200
        await eventually(lambda: eb.up, what="b healthy again")
        assert eb.health.state == HEALTHY
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_ejection_schedules_the_cool_down_probe_and_the_endpoint_comes_back() -> None:
    backend = Backend()
    outlier = OutlierDetection(consecutive_failures=1, ejection=0.05)
    checker, (ep,) = checker_for([backend], CHECKS, outlier)
    ep.health.request_failed("status 502", outlier)
    assert not ep.up and ep.key in checker.probing
    await asyncio.sleep(0.01)
    assert backend.checks == []  # not before the cool-down
    await eventually(lambda: ep.up, what="the endpoint back")
    assert backend.checks == ["/health"] and ep.health.consecutive_failures == 0
    await eventually(lambda: not checker.probing, what="the probe task done")


async def test_a_failing_cool_down_probe_extends_the_ejection() -> None:
    backend = Backend()
    backend.failures = 2
    outlier = OutlierDetection(consecutive_failures=1, ejection=0.03)
    checker, (ep,) = checker_for([backend], CHECKS, outlier)
    start = asyncio.get_running_loop().time()
    ep.health.request_failed("status 502", outlier)
    await eventually(lambda: ep.up, what="the endpoint back")
    assert len(backend.checks) == 3  # two failed probes, each followed by a cool-down
    assert asyncio.get_running_loop().time() - start >= 0.085
    await eventually(lambda: not checker.probing, what="the probe task done")


async def test_the_checker_ends_an_ejection_with_its_next_passing_check() -> None:
    backend = Backend()
    outlier = OutlierDetection(consecutive_failures=1, ejection=60)
    checks = HealthChecks(interval=0.005, timeout=0.5)
    checker, (ep,) = checker_for([backend], checks, outlier)
    ep.health.request_failed("status 502", outlier)
    assert not ep.up
    task = asyncio.get_running_loop().create_task(checker.run())
    try:
        await eventually(lambda: ep.up, what="the endpoint back before its 60 s cool-down")
        assert ep.health.state == HEALTHY and backend.checks
    finally:
        task.cancel()
        checker.close()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_cool_down_probe_waits_for_the_ejection_in_force(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An ejection a check ended, then a new one: the probe task started for the first
    must not probe at the first one's end."""
    backend = Backend()
    outlier = OutlierDetection(consecutive_failures=1, ejection=0.05)
    checker, (ep,) = checker_for([backend], CHECKS, outlier)
    ep.health.request_failed("status 502", outlier)
    await asyncio.sleep(0.01)  # the probe task sleeps until the cool-down's end
    ep.health.checked(None, CHECKS, outlier)  # ends the ejection; the task sleeps on
    await asyncio.sleep(0.02)
    longer = OutlierDetection(consecutive_failures=1, ejection=30)
    ep.health.request_failed("status 502", longer)  # ejected again, for 30 s
    assert ep.key in checker.probing
    await asyncio.sleep(0.06)  # past the first ejection's end
    assert backend.checks == [] and ep.health.ejected
    checker.close()


async def test_one_probe_task_per_ejection_and_none_for_unknown_endpoints() -> None:
    backend = Backend()
    outlier = OutlierDetection(consecutive_failures=1, ejection=5)
    checker, (ep,) = checker_for([backend], CHECKS, outlier)
    stranger = Health("http://elsewhere:8000", HealthBoard())
    checker._transition(stranger, HEALTHY, EJECTED)
    assert not checker.probing
    ep.health.request_failed("status 502", outlier)
    task = checker.probing[ep.key]
    checker._transition(ep.health, HEALTHY, EJECTED)  # a repeat does not start another
    assert checker.probing == {ep.key: task}
    checker.close()
    await eventually(lambda: not checker.probing, what="the probe cancelled")


async def test_close_cancels_the_probes() -> None:
    backend = Backend()
    outlier = OutlierDetection(consecutive_failures=1, ejection=5)
    checker, (ep,) = checker_for([backend], CHECKS, outlier)
    ep.health.request_failed("status 502", outlier)
    task = checker.probing[ep.key]
    checker.close()
    await asyncio.wait([task], timeout=1)
    assert task.cancelled()
    await eventually(lambda: not checker.probing, what="the probe forgotten")
    assert ep.health.ejected and backend.checks == []
