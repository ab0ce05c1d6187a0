"""Active health checks and the probe that ends an ejection.

Every ``interval``, each known endpoint gets ``GET <path>`` with its own short timeouts; a
200 counts as a success. An endpoint turns unhealthy after ``unhealthy_threshold`` failed
checks in a row and healthy again after ``healthy_threshold`` successes in a row, so one
lost probe does not flap it. An endpoint ejected by outlier detection (failures of real
requests) gets no traffic for the cool-down, then one probe: a success lets it back in,
a failure starts another cool-down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from router import upstream
from router.cluster import Endpoint
from router.errors import UpstreamError

if TYPE_CHECKING:
    from router.reload import ConfigHolder

log = logging.getLogger("routeyard.health")


async def probe(endpoint: Endpoint, path: str, timeout: float) -> str | None:
    """None if ``GET path`` answers 200 in time, else what went wrong."""
    head = (f"GET {endpoint.origin.base_path}{path} HTTP/1.1\r\n"
            f"host: {endpoint.origin.host_header.decode()}\r\n"
            "user-agent: routeyard-health\r\ncontent-length: 0\r\n\r\n").encode()
    try:
        response = await upstream.request(
            endpoint.pool, head, b"",
            connect_timeout=timeout, first_byte_timeout=timeout, idle_timeout=timeout,
        )
        await response.read()
    except UpstreamError as exc:
        return f"health check: {exc}"
    if response.status != 200:
        return f"health check: status {response.status}"
    return None


class HealthMonitor:
    """Runs the checks of one worker over the endpoints of its current snapshot."""

    def __init__(self, holder: ConfigHolder) -> None:
        self.holder = holder
        self.probing: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        while True:
            checks = self.holder.current.config.health_checks
            if checks.enabled:
                endpoints = list(self.holder.registry.by_key.values())
                await asyncio.gather(*(self.check(e) for e in endpoints))
                await asyncio.sleep(checks.interval)
            else:
                await asyncio.sleep(1.0)

    async def check(self, endpoint: Endpoint) -> None:
        checks = self.holder.current.config.health_checks
        error = await probe(endpoint, checks.path, checks.timeout)
        was = endpoint.state
        endpoint.record_check(error is None, error, checks.healthy_threshold,
                              checks.unhealthy_threshold)
        if endpoint.ejected and time.monotonic() >= endpoint.ejected_until:
            self._after_probe(endpoint, error)
        if endpoint.state != was:
            log.warning("backend %s is now %s%s", endpoint.key, endpoint.state,
                        f" ({error})" if error else "")

    def eject(self, endpoint: Endpoint) -> None:
        """Called when outlier detection ejects ``endpoint``: probe it after the cool-down."""
        log.warning("backend %s ejected for %.1fs after %d failures in a row (last: %s)",
                    endpoint.key, endpoint.ejected_until - time.monotonic(),
                    endpoint.consecutive_failures, endpoint.last_error)
        task = asyncio.get_running_loop().create_task(self._probe_after_cooldown(endpoint))
        self.probing.add(task)
        task.add_done_callback(self.probing.discard)

    async def _probe_after_cooldown(self, endpoint: Endpoint) -> None:
        while endpoint.ejected:
            await asyncio.sleep(max(0.0, endpoint.ejected_until - time.monotonic()))
            if not endpoint.ejected:
                return
            checks = self.holder.current.config.health_checks
            self._after_probe(endpoint, await probe(endpoint, checks.path, checks.timeout))

    def _after_probe(self, endpoint: Endpoint, error: str | None) -> None:
        if error is None:
            endpoint.end_ejection()
            log.warning("backend %s is back after its ejection", endpoint.key)
        else:
            endpoint.last_error = error
            endpoint.ejected_until = (time.monotonic()
                                      + self.holder.current.config.outlier_detection.ejection)

    def close(self) -> None:
        for task in self.probing:
            task.cancel()
