"""The metrics sink in process: key and origin labels, batch lines, the batch gauges."""

from __future__ import annotations

from pathlib import Path
from time import perf_counter

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.dispatch import RouterDispatcher
from router.endpoint import EndpointRegistry
from router.metrics import Metrics
from router.proxy import Proxy
from router.record import Record, Sinks
from router.reload import ConfigHolder
from router.stored_responses import ResponseIds
from router.tenants.config import hash_key
from router.tenants.limits import LocalLimiter
from router.upstream_mock import MockReply, MockRequest, MockTransport

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(metrics: Metrics) -> Samples:
    metrics.flush()
    found: Samples = {}
    for family in text_string_to_metric_families(metrics.render_now().decode()):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def finished(sinks: Sinks, status: int, key_id: str | None, origin: str = "online",
             tokens: tuple[int, int] | None = None) -> None:
    record = Record("POST", "/v1/chat/completions", {}, "chat", "chat", "id", perf_counter(),
                    10, origin=origin, key_id=key_id)
    record.label_model = "m"
    record.outcome.backend = "http://b:8000"
    record.outcome.status = status
    if tokens is not None:
        record.outcome.input_tokens, record.outcome.output_tokens = tokens
    sinks.settle(record, None)


def test_requests_and_tokens_are_labelled_by_key_and_origin() -> None:
    metrics = Metrics()
    sinks = Sinks([metrics])
    finished(sinks, 200, "team-a", tokens=(3, 5))
    finished(sinks, 200, "team-a", tokens=(1, 1))
    finished(sinks, 200, None, tokens=(7, 0))
    finished(sinks, 200, "team-a", "batch", tokens=(2, 2))
    finished(sinks, 500, "team-b")
    found = samples(metrics)
    rg = {"model": "m", "group": "chat", "backend": "http://b:8000"}
    assert value(found, "routeyard_requests_total", **rg, key="team-a", origin="online",
                 code="200") == 2
    assert value(found, "routeyard_requests_total", **rg, key="", origin="online",
                 code="200") == 1
    assert value(found, "routeyard_requests_total", **rg, key="team-a", origin="batch",
                 code="200") == 1
    assert value(found, "routeyard_requests_total", **rg, key="team-b", origin="online",
                 code="500") == 1
    assert value(found, "routeyard_tokens_total", model="m", key="team-a", origin="online",
                 type="input") == 4
    assert value(found, "routeyard_tokens_total", model="m", key="team-a", origin="online",
                 type="output") == 6
    assert value(found, "routeyard_tokens_total", model="m", key="", origin="online",
                 type="input") == 7
    assert value(found, "routeyard_tokens_total", model="m", key="team-a", origin="batch",
                 type="output") == 2
    # the histograms have no key or origin: each series adds its observations
    assert value(found, "routeyard_request_duration_seconds_count", **rg) == 5
    finished(sinks, 200, "team-a")  # a second flush adds only what is new
    assert value(samples(metrics), "routeyard_requests_total", **rg, key="team-a",
                 origin="online", code="200") == 3


def test_a_series_is_made_once_per_key() -> None:
    metrics = Metrics()
    first = metrics.series("m", "chat", "b", "team-a", "online")
    assert metrics.series("m", "chat", "b", "team-a", "online") is first
    assert metrics.series("m", "chat", "b", "team-b", "online") is not first


class Lines:
    def __init__(self) -> None:
        self.counts = (0, 0, 0)
        self.in_flight = 0

    def take(self) -> tuple[int, int, int]:
        counts, self.counts = self.counts, (0, 0, 0)
        return counts


class Batches:
    """A batch service as the metrics read it; ``broken`` makes its database fail."""

    def __init__(self) -> None:
        self.lines: Lines | None = Lines()
        self.figures: tuple[dict[str, int], float] = ({}, 0.0)
        self.broken = False

    async def gauges(self) -> tuple[dict[str, int], float]:
        if self.broken:
            raise OSError("database down")
        return self.figures


async def test_batch_metrics_come_from_the_batch_service(caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    metrics = Metrics()
    batches = Batches()
    metrics.watch_batches(batches, ("validating", "in_progress", "completed"))
    assert batches.lines is not None
    batches.lines.counts, batches.lines.in_flight = (5, 1, 3), 2
    batches.figures = ({"in_progress": 2, "completed": 7}, 12.5)

    def scraped(body: bytes) -> Samples:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(body.decode()) for s in f.samples}

    found = scraped(await metrics.render())
    assert value(found, "routeyard_batch_lines_total", outcome="completed") == 5
    assert value(found, "routeyard_batch_lines_total", outcome="failed") == 1
    assert value(found, "routeyard_batch_lines_total", outcome="retried") == 3
    assert value(found, "routeyard_batch_lines_in_flight") == 2
    assert value(found, "routeyard_batches", status="in_progress") == 2
    assert value(found, "routeyard_batches", status="completed") == 7
    assert ("routeyard_batches", (("status", "validating"),)) in found  # zeros exported
    assert value(found, "routeyard_batch_oldest_queued_age_seconds") == 12.5

    batches.broken = True  # the scrape still answers, with the last figures
    batches.lines.in_flight = 0
    with caplog.at_level("INFO", logger="routeyard.metrics"):
        found = scraped(await metrics.render())
        scraped(await metrics.render())
        assert value(found, "routeyard_batches", status="completed") == 7
        assert value(found, "routeyard_batch_lines_in_flight") == 0
        assert value(found, "routeyard_batch_lines_total", outcome="completed") == 5
        batches.broken = False
        batches.figures = ({"completed": 8}, 0.0)
        found = scraped(await metrics.render())
    assert value(found, "routeyard_batches", status="completed") == 8
    said = [r.getMessage() for r in caplog.records if r.name == "routeyard.metrics"]
    assert len(said) == 2  # once per outage, and once when it is over
    assert "did not answer (OSError('database down'))" in said[0]
    assert said[1] == "batch metrics: the batch database answers again"


ROUTES = f"""auth:
  keys:
    - id: batch-key
      hash: {hash_key("ry-" + "k" * 40)}
      models: [chat-a]
models:
  chat-a:
    backends:
      - url: http://engine-a:8000
    endpoints: [chat]
"""


def _engine(request: MockRequest) -> MockReply:
    body = orjson.dumps({"object": "chat.completion",
                         "usage": {"prompt_tokens": 3, "completion_tokens": 2}})
    return MockReply(200, [(b"content-type", b"application/json")], [body])


async def test_a_batch_line_is_counted_once_with_origin_batch(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(ROUTES)
    holder = ConfigHolder(path, EndpointRegistry(transports=lambda origin: MockTransport(
        _engine)))
    await holder.load()
    metrics = Metrics()
    proxy = Proxy(holder, ResponseIds())
    proxy.start(LocalLimiter(), [metrics], None)
    line = orjson.dumps({"model": "chat-a", "messages": [{"role": "user", "content": "hi"}]})
    status, _body = await RouterDispatcher(proxy).dispatch("/v1/chat/completions", line,
                                                           "batch-key")
    assert status == 200
    found = samples(metrics)
    requests = {labels: v for (name, labels), v in found.items()
                if name == "routeyard_requests_total"}
    assert requests == {(("backend", "http://engine-a:8000"), ("code", "200"),
                         ("group", "chat"), ("key", "batch-key"), ("model", "chat-a"),
                         ("origin", "batch")): 1.0}
    assert value(found, "routeyard_tokens_total", model="chat-a", key="batch-key",
                 origin="batch", type="input") == 3
    holder.close()
