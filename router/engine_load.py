"""What an engine's ``/metrics`` says about its load, and how old that is.

``parse_engine_metrics`` reads the three series routing needs from vLLM's Prometheus text:
``vllm:num_requests_running``, ``vllm:num_requests_waiting`` (summed over the ``engine``
label: data-parallel ranks) and ``vllm:kv_cache_usage_perc`` (0..1, the fullest rank). It
is a targeted line scanner, not ``prometheus_client.parser.text_string_to_metric_families``:
vLLM's ``/metrics`` has hundreds of lines (histogram buckets above all), and the library
builds an object per sample of every family. For a body shaped like vLLM 0.32's
(``tests/vllm_metrics.py``: 370 lines, 31 KB) the library took about 6 ms per scrape on
this machine kind and the scanner about 25 µs; at the default interval of 200 ms per
backend and per worker that is 3 % of a core against 0.013 %.
``tests/unit/test_engine_load.py`` keeps the scanner at least 20 times faster.

``EngineLoad`` is one endpoint's last reading, kept by the scraper (``router.scraper``)
and read by the scored balancers. Between scrapes the router credits its own dispatches and
completions: ``base`` is the endpoint's in-flight count (this worker's) when the scrape was
sent, so ``in_flight - base`` is what this worker sent there since, net of what finished.
"""

from __future__ import annotations

from typing import NamedTuple

RUNNING = b"vllm:num_requests_running"
WAITING = b"vllm:num_requests_waiting"
KV_CACHE = b"vllm:kv_cache_usage_perc"


class EngineReading(NamedTuple):
    """The engine's own counts at one scrape."""

    running: int
    waiting: int
    #: KV-cache use, 0..1.
    kv_cache: float


class ScrapeSettings(NamedTuple):
    """How one endpoint's ``/metrics`` is read: the path, every ``interval`` seconds, each
    phase of the exchange (connect, first byte, between chunks) within ``timeout``."""

    path: str
    interval: float
    timeout: float


def _samples(body: bytes, name: bytes) -> list[float]:
    """The values of every sample of series ``name`` (not of longer names it prefixes);
    ``# HELP`` and ``# TYPE`` lines do not start with the name, so they are skipped."""
    values = []
    size = len(name)
    at = body.find(name)
    while at >= 0:
        if at and body[at - 1] != 10:  # not at the start of a line
            at = body.find(name, at + size)
            continue
        after = at + size
        end = body.find(b"\n", after)
        if end < 0:
            end = len(body)
        if body[after:after + 1] in (b"{", b" "):
            line = body[after:end]
            close = line.rfind(b"}")  # label values never follow it; value, timestamp do
            fields = line[close + 1:].split()
            if not fields:
                raise ValueError(f"{name.decode()}: a sample without a value")
            values.append(float(fields[0]))
        at = body.find(name, end)
    return values


def parse_engine_metrics(body: bytes) -> EngineReading:
    """The reading in a vLLM ``/metrics`` body; ``ValueError`` naming what is missing or
    malformed (a backend that is not vLLM, or a partial body)."""
    running = _samples(body, RUNNING)
    waiting = _samples(body, WAITING)
    kv = _samples(body, KV_CACHE)
    missing = [n.decode() for n, v in ((RUNNING, running), (WAITING, waiting), (KV_CACHE, kv))
               if not v]
    if missing:
        raise ValueError(f"no {', '.join(missing)} in /metrics (not a vLLM engine?)")
    usage = max(kv)
    if not 0.0 <= usage <= 1.0:
        usage = min(max(usage, 0.0), 1.0) if usage == usage else 1.0  # NaN: call it full
    return EngineReading(int(sum(running)), int(sum(waiting)), usage)


class EngineLoad:
    """One endpoint's last engine reading, its age, and the router's credit since."""

    __slots__ = ("at", "base", "error", "kv_cache", "read", "running", "scraped_at",
                 "waiting")

    def __init__(self) -> None:
        #: Whether any scrape succeeded yet (the counts below mean nothing before).
        self.read = False
        self.running = 0
        self.waiting = 0
        self.kv_cache = 0.0
        #: Monotonic time the last good scrape was sent (its age counts from there).
        self.at = 0.0
        #: Wall-clock time of that scrape, for the admin view.
        self.scraped_at = 0.0
        #: This worker's in-flight count at the endpoint when that scrape was sent.
        self.base = 0
        #: Why the latest scrape failed; None once one succeeds.
        self.error: str | None = None

    def update(self, reading: EngineReading, at: float, scraped_at: float, base: int) -> None:
        self.running, self.waiting, self.kv_cache = reading
        self.at, self.scraped_at, self.base = at, scraped_at, base
        self.read = True
        self.error = None

    def failed(self, error: str) -> None:
        """A scrape failed: the last reading stays (and ages), the reason is kept."""
        self.error = error

    def fresh(self, now: float, max_age: float) -> bool:
        return self.read and now - self.at <= max_age

    def queue(self, in_flight: int) -> int:
        """The engine's waiting and running requests, plus what this worker dispatched
        there since the scrape (net of completions): never below zero."""
        return max(0, self.waiting + self.running + in_flight - self.base)

    def describe(self, now: float, in_flight: int) -> dict[str, object] | None:
        """The admin view: the last reading, its age, the credit since, the last error."""
        if not self.read:
            return None if self.error is None else {"error": self.error}
        return {"running": self.running, "waiting": self.waiting,
                "kv_cache_usage": self.kv_cache, "age_s": round(now - self.at, 3),
                "dispatched_since": in_flight - self.base, "error": self.error}
