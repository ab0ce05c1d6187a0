"""Endpoint health: one state machine per endpoint, and the checks that feed it.

``Health`` is the only place that decides whether an endpoint may get traffic. Reports
come in (a request succeeded or failed, an active check or an ejection probe answered);
transitions go out to the listeners of its ``HealthBoard`` (the log, the registry that
wakes queues and reviews panic mode, the checker that probes an ejected endpoint after its
cool-down). Two independent conditions make an endpoint unusable:

- **unhealthy**: ``unhealthy_threshold`` active checks failed in a row; it is healthy
  again after ``healthy_threshold`` successes in a row, so one lost probe does not flap it;
- **ejected** (outlier detection): ``consecutive_failures`` gateway failures in a row
  (connect error or timeout, reset, invalid HTTP, a 502/503/504 answer), or
  ``consecutive_5xx`` failures of any kind in a row (a 500 answer counts only here: a client
  can cause one). The ejection ends at once when an active check started after it passes
  (``uneject_on_health_check``); else after the cool-down, one probe: a success lets it
  back in, a failure starts another cool-down.

An ejection goes ahead only when ``may_eject`` (from the endpoint: every model it serves
can spare it, ``Cluster.may_eject``) says so; the streak keeps counting, so a later failure
ejects once a model can spare it. An ejected endpoint is still **up** while its ejection is
``waived``: a model it serves is in panic mode (``Cluster.review``).

A recovery (back to healthy, an ejection over) ends the failure streak: its counters and
``last_error`` clear, so the admin view shows the state now, not the last incident.

``HealthChecker`` runs the active checks of one worker and the ejection probes, and asks
each engine which models it serves (``EngineModels``; the rule is in its docstring).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, NamedTuple, Protocol

import orjson

from router.errors import UpstreamError
from router.isotime import iso
from router.upstream import Reachable, Timeouts

if TYPE_CHECKING:
    from router.config import HealthChecks, OutlierDetection
    from router.upstream import Origin

log = logging.getLogger("routeyard.health")

HEALTHY, UNHEALTHY, EJECTED = "healthy", "unhealthy", "ejected"
#: (health, state before, state after) for each transition.
Listener = Callable[["Health", str, str], None]
#: Answers that are gateway failures (Envoy's ``isGatewayError``); other failed answers
#: (500) count toward ``consecutive_5xx`` only.
GATEWAY_STATUSES = frozenset({502, 503, 504})


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
        "active_failures", "active_successes", "board", "consecutive_5xx",
        "consecutive_failures", "ejected", "ejected_at", "ejected_until", "healthy", "key",
        "last_check", "last_error", "up", "waived",
    )

    def __init__(self, key: str, board: HealthBoard) -> None:
        self.key = key
        self.board = board
        #: Healthy, and not ejected or its ejection waived: may get traffic (capacity
        #: permitting).
        self.up = True
        self.healthy = True
        self.ejected = False
        #: A model this endpoint serves is in panic mode: routed to even while ejected.
        self.waived = False
        self.ejected_at = 0.0
        self.ejected_until = 0.0
        #: Gateway failures in a row (compared with ``consecutive_failures``).
        self.consecutive_failures = 0
        #: Failures of any kind in a row, 500 answers included (``consecutive_5xx``);
        #: never less than ``consecutive_failures``.
        self.consecutive_5xx = 0
        self.active_failures = 0
        self.active_successes = 0
        self.last_error: str | None = None
        self.last_check: float | None = None

    @property
    def state(self) -> str:
        if self.ejected:
            return EJECTED
        return HEALTHY if self.healthy else UNHEALTHY

    @property
    def in_rotation(self) -> bool:
        """Healthy and not ejected, waivers aside: what caps and panic mode count."""
        return self.healthy and not self.ejected

    def _set(self, healthy: bool, ejected: bool) -> None:
        before = self.state
        self.healthy = healthy
        self.ejected = ejected
        self.up = healthy and (not ejected or self.waived)
        after = self.state
        if after != before:
            self.board.notify(self, before, after)

    def waive(self, waived: bool) -> bool:
        """Set whether an ejection is waived (panic mode); True if that made it up."""
        was = self.up
        self.waived = waived
        self.up = self.healthy and (not self.ejected or waived)
        return self.up and not was

    def _eject(self, outlier: OutlierDetection) -> None:
        self.ejected_at = time.monotonic()
        self.ejected_until = self.ejected_at + outlier.ejection
        self._set(self.healthy, True)

    def _forgive(self) -> None:
        self.consecutive_failures = self.consecutive_5xx = 0
        self._clear_if_well()

    def _clear_if_well(self) -> None:
        """No failure streak left and in rotation: ``last_error`` is history, cleared."""
        if (self.healthy and not self.ejected and not self.active_failures
                and not self.consecutive_5xx):
            self.last_error = None

    # -- reports from real requests (passive outlier detection) ---------------------------
    def request_succeeded(self) -> None:
        if self.consecutive_5xx:  # the hot path: one read when there is nothing to reset
            self._forgive()

    def request_failed(self, error: str, outlier: OutlierDetection,
                       status: int | None = None,
                       may_eject: Callable[[], bool] | None = None) -> None:
        """A request failed at this endpoint: no answer (``status`` None: connect error,
        timeout, reset, invalid HTTP) or a 5xx answer. ``may_eject`` (None: always) is
        asked before an ejection."""
        self.last_error = error
        self.consecutive_5xx += 1
        if status is None or status in GATEWAY_STATUSES:
            self.consecutive_failures += 1
        else:
            self.consecutive_failures = 0
        if self.ejected:
            return
        gateway = self.consecutive_failures >= outlier.consecutive_failures
        if not gateway and self.consecutive_5xx < outlier.consecutive_5xx:
            return
        if may_eject is None or may_eject():
            self._eject(outlier)
        elif (self.consecutive_failures == outlier.consecutive_failures
              or self.consecutive_5xx == outlier.consecutive_5xx):
            log.warning("backend %s not ejected after %d failures in a row (last: %s): a "
                        "model it serves would keep too few backends (max_ejection_percent "
                        "%d)", self.key, self.consecutive_5xx, error,
                        outlier.max_ejection_percent)

    # -- reports from the checker ---------------------------------------------------------
    def checked(self, error: str | None, checks: HealthChecks, outlier: OutlierDetection,
                started: float | None = None) -> None:
        """An active check answered (``error`` None) or failed. A pass ends an ejection
        that began before the check did (``started``, monotonic; None: any), with
        ``uneject_on_health_check``; past an ejection's cool-down a check is also its
        probe."""
        self.last_check = time.time()
        healthy = self.healthy
        ejected = self.ejected
        if error is None:
            self.active_failures = 0
            self.active_successes += 1
            recovered = False
            if not healthy and self.active_successes >= checks.healthy_threshold:
                healthy = recovered = True
            if (ejected and outlier.uneject_on_health_check
                    and (started is None or started >= self.ejected_at)):
                ejected, recovered = False, True
            self._set(healthy, ejected)
            if recovered:
                self._forgive()
            else:
                self._clear_if_well()
        else:
            self.last_error = error
            self.active_successes = 0
            self.active_failures += 1
            if healthy and self.active_failures >= checks.unhealthy_threshold:
                healthy = False
            self._set(healthy, ejected)
        if self.ejected and time.monotonic() >= self.ejected_until:
            self.probed(error, outlier)

    def probed(self, error: str | None, outlier: OutlierDetection) -> None:
        """The probe at the end of an ejection's cool-down answered (or not)."""
        if not self.ejected:
            return
        if error is None:
            self._set(self.healthy, False)
            self._forgive()
        else:
            self.last_error = error
            self.ejected_until = time.monotonic() + outlier.ejection

    def describe(self) -> dict[str, object]:
        return {
            "state": self.state,
            "up": self.up,
            "consecutive_failures": self.consecutive_failures,
            "consecutive_5xx": self.consecutive_5xx,
            "last_error": self.last_error,
            "last_check": iso(self.last_check),
        }


def _log_transition(health: Health, before: str, after: str) -> None:
    """Going down at WARNING, coming back at INFO."""
    if after == EJECTED:
        log.warning("backend %s ejected for %.1fs after %d failures in a row (the last %d "
                    "gateway failures; last: %s)", health.key,
                    health.ejected_until - time.monotonic(), health.consecutive_5xx,
                    health.consecutive_failures, health.last_error)
    elif after == UNHEALTHY:
        log.warning("backend %s is now unhealthy%s", health.key,
                    f" ({health.last_error})" if health.last_error else "")
    elif before == EJECTED:
        log.info("backend %s is back after its ejection", health.key)
    else:
        log.info("backend %s is healthy again", health.key)


#: Passing checks between two reads of an engine's ``/v1/models`` while nothing is amiss.
MODELS_EVERY = 12
#: The most served names a reason lists.
NAMES_SHOWN = 20


class ListedAdapter(NamedTuple):
    """A LoRA adapter as an engine's ``/v1/models`` lists it: a card with a ``parent``."""

    #: The served name of the base model it applies to.
    parent: str
    #: The card's ``root`` (vLLM: the path the adapter was loaded from), if any.
    root: str | None


class ModelListing(NamedTuple):
    """An engine's ``GET /v1/models``: every id it lists, and which of them are adapters."""

    ids: frozenset[str]
    adapters: dict[str, ListedAdapter]


class EngineModels:
    """What one engine said its ``/v1/models`` serves, and when to ask again.

    The checker reads ``/v1/models`` after a passing ``/health`` check when one of these
    holds: a model routed here discovers its adapters (``discover``: at every check), it
    never has (or the last read failed), the check before failed (the engine may have
    restarted with other flags), the names the endpoint's models send changed (a reload), a
    name is missing (so a fix is seen at the next check), or ``MODELS_EVERY`` checks passed
    since. An engine that answers anything but 200 and a model list (a non-vLLM backend's
    404, a 401) lists nothing: ``served`` is None, and its backends are judged by
    ``/health`` alone."""

    __slots__ = ("adapters", "asked", "checks", "discover", "served", "stale")

    def __init__(self) -> None:
        #: The model ids the engine lists; None: not known, or it lists none.
        self.served: frozenset[str] | None = None
        #: The LoRA adapters among them (id → parent and root).
        self.adapters: dict[str, ListedAdapter] = {}
        #: A model routed here has ``discover: true``: read at every passing check.
        self.discover = False
        #: The names the endpoint's models sent when ``served`` was read.
        self.asked: frozenset[str] = frozenset()
        #: Passing checks since ``served`` was read.
        self.checks = 0
        #: Read at the next passing check.
        self.stale = True

    def serves(self, name: str) -> bool:
        """Whether a request for ``name`` may go to this engine (True when not known)."""
        return self.served is None or name in self.served

    def missing(self, names: Iterable[str]) -> list[str]:
        """The names of ``names`` the engine is known not to serve."""
        served = self.served
        return [] if served is None else sorted(n for n in names if n not in served)

    def due(self, wanted: frozenset[str]) -> bool:
        """Whether a passing check should read ``/v1/models`` now (the class docstring);
        never for an endpoint no model routes to."""
        return bool(wanted) and (self.discover or self.stale or self.checks >= MODELS_EVERY
                                 or wanted != self.asked or bool(self.missing(wanted)))

    def adapters_of(self, parent: str) -> list[str]:
        """The ids of the adapters the engine lists with ``parent`` as their base model."""
        return [name for name, listed in self.adapters.items() if listed.parent == parent]

    def not_served(self, name: str) -> str:
        """The reason a backend is out for model ``name``."""
        listed = sorted(self.served or ())
        shown = ", ".join(listed[:NAMES_SHOWN]) or "nothing"
        more = f" and {len(listed) - NAMES_SHOWN} more" if len(listed) > NAMES_SHOWN else ""
        return f"model {name} not served (engine serves: {shown}{more})"


class Checked(Reachable, Protocol):
    """An endpoint as the checker sees it."""

    @property
    def health(self) -> Health: ...
    @property
    def engine(self) -> EngineModels: ...

    def wanted_models(self) -> frozenset[str]: ...

    def models_changed(self) -> None: ...


def _get(origin: Origin, path: str, extra: str = "") -> bytes:
    return (f"GET {origin.base_path}{path} HTTP/1.1\r\n"
            f"host: {origin.host_header.decode()}\r\n{extra}"
            "user-agent: routeyard-health\r\ncontent-length: 0\r\n\r\n").encode()


async def probe(endpoint: Checked, path: str, timeout: float) -> str | None:
    """None if ``GET path`` answers 200 in time, else what went wrong."""
    head = _get(endpoint.origin, path)
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


async def listed_models(endpoint: Checked, timeout: float) -> ModelListing | None:
    """The engine's ``GET /v1/models`` (sent with the engine's key), or None when it
    answers anything but 200 with a model list; ``UpstreamError`` when no answer came."""
    head = _get(endpoint.origin, "/v1/models", endpoint.api_key_header or "")
    response = await endpoint.transport.handle(head, b"", Timeouts(timeout, timeout, timeout))
    try:
        body = await response.read()
    finally:
        response.close()
    if response.status != 200:
        return None
    return parse_listing(body)


def parse_listing(body: bytes) -> ModelListing | None:
    """A ``/v1/models`` body as vLLM writes it (``{"data": [{"id", "parent", "root"}, …]}``),
    or None when it is not a model list. A card whose ``parent`` is a string is an adapter;
    a ``root`` that is not a string is left out."""
    try:
        data = orjson.loads(body).get("data")
        cards = [(card["id"], card.get("parent"), card.get("root")) for card in data]
    except (orjson.JSONDecodeError, AttributeError, TypeError, KeyError):
        return None
    if not all(isinstance(i, str) for i, _, _ in cards):
        return None
    adapters = {i: ListedAdapter(parent, root if isinstance(root, str) else None)
                for i, parent, root in cards if isinstance(parent, str) and parent}
    return ModelListing(frozenset(i for i, _, _ in cards), adapters)


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
        started = time.monotonic()
        error = await probe(endpoint, checks.path, checks.timeout)
        endpoint.health.checked(error, checks, outlier, started)
        engine = endpoint.engine
        if error is not None:
            engine.stale = True
            return
        engine.checks += 1
        wanted = endpoint.wanted_models()
        if engine.due(wanted):
            await self.check_models(endpoint, wanted, checks.timeout)

    async def check_models(self, endpoint: Checked, wanted: frozenset[str],
                           timeout: float) -> None:
        """Read which models the engine serves; log each name that goes missing (WARNING)
        or comes back (INFO) once, and tell the endpoint's models."""
        engine = endpoint.engine
        try:
            listing = await listed_models(endpoint, timeout)
        except UpstreamError:
            engine.stale = True  # /health answered: try again at the next check
            return
        before = set(engine.missing(engine.asked))
        served = listing.ids if listing is not None else None
        engine.served, engine.asked, engine.checks, engine.stale = served, wanted, 0, False
        engine.adapters = listing.adapters if listing is not None else {}
        now = engine.missing(wanted)
        for name in now:
            if name not in before:
                log.warning("backend %s: %s; it gets no requests for that model",
                            endpoint.health.key, engine.not_served(name))
        for name in sorted(before - set(now)):
            if served is None or name in served:
                log.info("backend %s serves model %s again", endpoint.health.key, name)
        endpoint.models_changed()

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
            # Until the end of the ejection in force now: a check may have ended the one
            # this task was started for, and a later one begun.
            remaining = health.ejected_until - time.monotonic()
            if remaining > 0:
                await asyncio.sleep(remaining)
                continue
            checks, outlier = self.settings()
            health.probed(await probe(endpoint, checks.path, checks.timeout), outlier)

    def close(self) -> None:
        for task in list(self.probing.values()):
            task.cancel()
