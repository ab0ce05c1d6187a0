"""Endpoint health: one state machine per endpoint, and the checks that feed it.

``Health`` is the only place that decides whether an endpoint may get traffic. Reports
come in (a request succeeded or failed, an active check or an ejection probe answered);
transitions go out to the listeners of its ``HealthBoard`` (the log, the checker that
probes an ejected endpoint after its cool-down). Two independent conditions make an
endpoint unusable:

- **unhealthy**: ``unhealthy_threshold`` active checks failed in a row; it is healthy
  again after ``healthy_threshold`` successes in a row, so one lost probe does not flap it;
- **ejected** (outlier detection): ``consecutive_failures`` real requests failed in a row;
  no traffic for the cool-down, then one probe: a success lets it back in, a failure
  starts another cool-down.

``HealthChecker`` runs the active checks of one worker and the ejection probes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

from router.errors import UpstreamError
from router.upstream import Timeouts

if TYPE_CHECKING:
    from router.config import HealthChecks, OutlierDetection
    from router.upstream import Origin, Transport

log = logging.getLogger("routeyard.health")

HEALTHY, UNHEALTHY, EJECTED = "healthy", "unhealthy", "ejected"
#: (health, state before, state after) for each transition.
Listener = Callable[["Health", str, str], None]


class HealthBoard:
    """The listeners of every endpoint's health in one worker."""

    def __init__(self) -> None:
        self.listeners: list[Listener] = [_log_transition]

    def notify(self, health: Health, before: str, after: str) -> None:
        for listener in self.listeners:
            listener(health, before, after)


class Health:
    """The health of one endpoint: reports in, transitions out."""

    __slots__ = (
        "active_failures", "active_successes", "board", "consecutive_failures", "ejected",
        "ejected_until", "healthy", "key", "last_check", "last_error", "up",
    )

    def __init__(self, key: str, board: HealthBoard) -> None:
        self.key = key
        self.board = board
        #: Healthy and not ejected: may get traffic (capacity permitting).
        self.up = True
        self.healthy = True
        self.ejected = False
        self.ejected_until = 0.0
        self.consecutive_failures = 0
        self.active_failures = 0
        self.active_successes = 0
        self.last_error: str | None = None
        self.last_check: float | None = None

    @property
    def state(self) -> str:
        if self.ejected:
            return EJECTED
        return HEALTHY if self.healthy else UNHEALTHY

    def _set(self, healthy: bool, ejected: bool) -> None:
        before = self.state
        self.healthy = healthy
        self.ejected = ejected
        self.up = healthy and not ejected
        after = self.state
        if after != before:
            self.board.notify(self, before, after)

    # -- reports from real requests (passive outlier detection) ---------------------------
    def request_succeeded(self) -> None:
        self.consecutive_failures = 0

    def request_failed(self, error: str, outlier: OutlierDetection) -> None:
        """A request failed at this endpoint (no connection, or a 5xx answer)."""
        self.last_error = error
        self.consecutive_failures += 1
        if not self.ejected and self.consecutive_failures >= outlier.consecutive_failures:
            self.ejected_until = time.monotonic() + outlier.ejection
            self._set(self.healthy, True)

    # -- reports from the checker ---------------------------------------------------------
    def checked(self, error: str | None, checks: HealthChecks,
                outlier: OutlierDetection) -> None:
        """An active check answered (``error`` None) or failed; past an ejection's
        cool-down it is also the ejection's probe."""
        self.last_check = time.time()
        healthy = self.healthy
        if error is None:
            self.active_failures = 0
            self.active_successes += 1
            if not healthy and self.active_successes >= checks.healthy_threshold:
                healthy = True
        else:
            self.last_error = error
            self.active_successes = 0
            self.active_failures += 1
            if healthy and self.active_failures >= checks.unhealthy_threshold:
                healthy = False
        self._set(healthy, self.ejected)
        if self.ejected and time.monotonic() >= self.ejected_until:
            self.probed(error, outlier)

    def probed(self, error: str | None, outlier: OutlierDetection) -> None:
        """The probe at the end of an ejection's cool-down answered (or not)."""
        if not self.ejected:
            return
        if error is None:
            self.consecutive_failures = 0
            self._set(self.healthy, False)
        else:
            self.last_error = error
            self.ejected_until = time.monotonic() + outlier.ejection

    def describe(self) -> dict[str, object]:
        return {
            "state": self.state,
            "consecutive_failures": self.consecutive_failures,
            "last_error": self.last_error,
            "last_check": self.last_check,
        }


def _log_transition(health: Health, before: str, after: str) -> None:
    if after == EJECTED:
        log.warning("backend %s ejected for %.1fs after %d failures in a row (last: %s)",
                    health.key, health.ejected_until - time.monotonic(),
                    health.consecutive_failures, health.last_error)
    elif before == EJECTED:
        log.warning("backend %s is back after its ejection", health.key)
    else:
        log.warning("backend %s is now %s%s", health.key, after,
                    f" ({health.last_error})" if after == UNHEALTHY and health.last_error
                    else "")


class Checked(Protocol):
    """An endpoint as the checker sees it."""

    @property
    def health(self) -> Health: ...
    @property
    def origin(self) -> Origin: ...
    @property
    def transport(self) -> Transport: ...


async def probe(endpoint: Checked, path: str, timeout: float) -> str | None:
    """None if ``GET path`` answers 200 in time, else what went wrong."""
    origin = endpoint.origin
    head = (f"GET {origin.base_path}{path} HTTP/1.1\r\n"
            f"host: {origin.host_header.decode()}\r\n"
            "user-agent: routeyard-health\r\ncontent-length: 0\r\n\r\n").encode()
    try:
        response = await endpoint.transport.handle(head, b"", Timeouts(timeout, timeout, timeout))
        try:
            await response.read()
        finally:
            response.close()
    except UpstreamError as exc:
        return f"health check: {exc}"
    if response.status != 200:
        return f"health check: status {response.status}"
    return None


class HealthChecker:
    """The active checks of one worker, and the probe that ends each ejection.

    ``endpoints`` gives the endpoints known now; ``settings`` the current (checks,
    outlier detection) settings, read anew each round so reloads apply."""

    def __init__(self, board: HealthBoard, endpoints: Callable[[], Iterable[Checked]],
                 settings: Callable[[], tuple[HealthChecks, OutlierDetection]]) -> None:
        self.endpoints = endpoints
        self.settings = settings
        self.probing: dict[str, asyncio.Task[None]] = {}
        board.listeners.append(self._transition)

    async def run(self) -> None:
        while True:
            checks, _ = self.settings()
            if checks.enabled:
                await asyncio.gather(*(self.check(e) for e in self.endpoints()))
                await asyncio.sleep(checks.interval)
            else:
                await asyncio.sleep(1.0)

    async def check(self, endpoint: Checked) -> None:
        checks, outlier = self.settings()
        error = await probe(endpoint, checks.path, checks.timeout)
        endpoint.health.checked(error, checks, outlier)

    def _transition(self, health: Health, before: str, after: str) -> None:
        if after != EJECTED or health.key in self.probing:
            return
        endpoint = next((e for e in self.endpoints() if e.health is health), None)
        if endpoint is None:
            return
        task = asyncio.get_running_loop().create_task(self._probe_after_cooldown(endpoint))
        self.probing[health.key] = task
        task.add_done_callback(lambda _t: self.probing.pop(health.key, None))

    async def _probe_after_cooldown(self, endpoint: Checked) -> None:
        health = endpoint.health
        while health.ejected:
            await asyncio.sleep(max(0.0, health.ejected_until - time.monotonic()))
            if not health.ejected:
                return
            checks, outlier = self.settings()
            health.probed(await probe(endpoint, checks.path, checks.timeout), outlier)

    def close(self) -> None:
        for task in list(self.probing.values()):
            task.cancel()
