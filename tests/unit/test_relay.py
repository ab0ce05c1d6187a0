"""router.relay.forward over MockTransport backends: the head sent, retries, health
reports, the Outcome, leases given back on every path, the queue, and the trace and
placement hooks. No sockets; every wait is for a positive signal."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from time import perf_counter
from typing import Any

import pytest

from router.config import OutlierDetection
from router.endpoint import Endpoint
from router.errors import (
    BackendTimeout,
    BackendUnavailable,
    NoHealthyBackend,
    QueueTimeout,
)
from router.record import CLIENT_CLOSED, Outcome, Record
from router.relay import Capture, NotHere, forward
from router.upstream import Response
from router.upstream_mock import Handler, MockReply, MockRequest
from tests.unit.core import (
    Fleet,
    Gate,
    PlacementStub,
    TraceStub,
    answers,
    assert_idle,
    endpoint,
    mark_down,
    model_of,
    model_yaml,
    outbound,
    read_all,
    read_captured,
    reply,
    snapshot_of,
    status_only,
    until,
)

A, B, C = Fleet.key("a"), Fleet.key("b"), Fleet.key("c")


async def sent_head(headers: dict[str, str], **kwargs: Any) -> MockRequest:
    """The request backend ``a`` got for an outbound with the client's ``headers``."""
    fleet = Fleet()
    model = await model_of(fleet, "a")
    await forward(model, outbound(headers=headers, **kwargs), Outcome(), read_all)
    [request] = fleet.requests("a")
    return request


def names(request: MockRequest) -> list[str]:
    return [n for n, _ in request.headers]


# -- the head sent ---------------------------------------------------------------------------
async def test_head_keeps_method_target_and_body_under_the_base_path() -> None:
    fleet = Fleet()
    snap = await snapshot_of("""
        models:
          m:
            backends: [{url: "http://a:8000/engine/"}]
            endpoints: [chat]
    """, fleet)
    body = b'{"model":"m","messages":[]}'
    out = outbound(body=body, method="PUT", target="/v1/chat/completions?x=1&y=%20",
                   headers={"host": "router.example", "content-type": "application/json"})
    status, _ = await forward(snap.models["m"], out, Outcome(), read_all)
    assert status == 200
    [request] = fleet.requests("a")
    assert request.method == "PUT"
    assert request.target == "/engine/v1/chat/completions?x=1&y=%20"
    assert request.body == body
    assert [v for n, v in request.headers if n == "host"] == ["a:8000"]
    assert [v for n, v in request.headers if n == "content-length"] == [str(len(body))]
    assert request.header("content-type") == "application/json"
    assert request.head.endswith(b"\r\n\r\n")


async def test_head_drops_hop_by_hop_headers_and_those_named_in_connection() -> None:
    request = await sent_head({
        "connection": "keep-alive, X-Hop-Secret , x-other-hop",
        "keep-alive": "timeout=5",
        "proxy-connection": "keep-alive",
        "proxy-authenticate": "Basic",
        "proxy-authorization": "Basic Zm9v",
        "te": "trailers",
        "trailer": "x-sum",
        "transfer-encoding": "chunked",
        "upgrade": "websocket",
        "expect": "100-continue",
        "content-length": "999",
        "x-hop-secret": "1",
        "x-other-hop": "2",
        "x-end-to-end": "kept",
        "user-agent": "sdk/1.0",
    })
    sent = names(request)
    for hop in ("connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
                "expect", "x-hop-secret", "x-other-hop"):
        assert hop not in sent, hop
    assert sent.count("content-length") == 1
    assert request.header("content-length") == str(len(request.body))
    assert request.header("x-end-to-end") == "kept"
    assert request.header("user-agent") == "sdk/1.0"


async def test_head_adds_x_request_id_only_when_absent() -> None:
    added = await sent_head({}, request_id="rid-7")
    assert [v for n, v in added.headers if n == "x-request-id"] == ["rid-7"]
    kept = await sent_head({"x-request-id": "client-id"}, request_id="rid-8")
    assert [v for n, v in kept.headers if n == "x-request-id"] == ["client-id"]


async def test_head_appends_client_ip_to_x_forwarded_for() -> None:
    fresh = await sent_head({}, client_ip="10.1.2.3")
    assert [v for n, v in fresh.headers if n == "x-forwarded-for"] == ["10.1.2.3"]
    chained = await sent_head({"x-forwarded-for": "1.1.1.1, 2.2.2.2"}, client_ip="10.1.2.3")
    assert [v for n, v in chained.headers if n == "x-forwarded-for"] == [
        "1.1.1.1, 2.2.2.2, 10.1.2.3"]


async def test_head_strips_client_keys_only_with_strip_keys() -> None:
    keys = {"authorization": "Bearer client-key", "x-api-key": "client-key"}
    stripped = await sent_head(keys, strip_keys=True)
    assert "authorization" not in names(stripped)
    assert "x-api-key" not in names(stripped)
    passed = await sent_head(keys, strip_keys=False)
    assert passed.header("authorization") == "Bearer client-key"
    assert passed.header("x-api-key") == "client-key"


async def test_head_replaces_client_keys_with_the_engine_key(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGINE_A_KEY", "engine-secret")
    fleet = Fleet()
    snap = await snapshot_of("""
        models:
          m:
            backends: [{url: "http://a:8000", api_key_env: ENGINE_A_KEY}]
            endpoints: [chat]
    """, fleet)
    headers = {"authorization": "Bearer client-key", "x-api-key": "client-key"}
    await forward(snap.models["m"], outbound(headers=headers), Outcome(), read_all)
    [request] = fleet.requests("a")
    assert [v for n, v in request.headers if n == "authorization"] == ["Bearer engine-secret"]
    assert "x-api-key" not in names(request)


async def test_head_trace_lines_replace_traceparent_and_tracestate() -> None:
    incoming = {"traceparent": f"00-{'c' * 32}-{'d' * 16}-01", "tracestate": "vendor=1"}
    fleet = Fleet()
    model = await model_of(fleet, "a")
    await forward(model, outbound(headers=incoming), Outcome(), read_all, trace=TraceStub())
    [traced] = fleet.requests("a")
    assert [v for n, v in traced.headers if n == "traceparent"] == [
        f"00-{'a' * 32}-{1:016x}-01"]
    assert "tracestate" not in names(traced)
    untraced = await sent_head(incoming)
    assert untraced.header("traceparent") == incoming["traceparent"]
    assert untraced.header("tracestate") == "vendor=1"


# -- retries and what counts as a failure ----------------------------------------------------
async def test_connect_failure_is_retried_on_the_other_backend() -> None:
    arrivals: list[float] = []

    def ok(request: MockRequest) -> MockReply:
        arrivals.append(perf_counter())
        return reply(200, b"from the second")

    fleet = Fleet(answers(BackendUnavailable("connection refused"), ok))
    model = await model_of(fleet, "a", "b")
    outcome = Outcome()
    status, body = await forward(model, outbound(), outcome, read_all)
    assert (status, body) == (200, b"from the second")
    first, second = fleet.names
    assert first != second
    assert outcome.backend == Fleet.key(second)
    assert outcome.retries == 1
    assert outcome.retried_from == (Fleet.key(first),)
    assert outcome.status == outcome.attempt_status == 200
    assert outcome.attempt_error is None
    assert 0 < outcome.t_sent <= arrivals[0]  # set by the first attempt, not the retry
    assert outcome.queue_wait == 0
    assert endpoint(model, first).health.consecutive_failures == 1
    assert endpoint(model, first).health.last_error == "connection refused"
    assert endpoint(model, second).health.consecutive_failures == 0
    assert_idle(model)


async def test_connect_failure_everywhere_raises_the_last_error() -> None:
    fleet = Fleet(answers(BackendUnavailable("connection refused")))
    model = await model_of(fleet, "a", "b")
    outcome = Outcome()
    with pytest.raises(BackendUnavailable):
        await forward(model, outbound(), outcome, read_all)
    assert sorted(fleet.names) == ["a", "b"]
    assert outcome.retries == 1
    assert outcome.attempt_status == 0
    assert outcome.attempt_error == "backend_unavailable"
    assert_idle(model)


async def test_connect_failure_not_retried_with_zero_attempts() -> None:
    fleet = Fleet(answers(BackendUnavailable("connection refused"), reply(200)))
    model = await model_of(fleet, "a", "b", retries="{attempts: 0}")
    with pytest.raises(BackendUnavailable):
        await forward(model, outbound(), Outcome(), read_all)
    assert len(fleet.asked) == 1
    assert_idle(model)


@pytest.mark.parametrize("attempts", [0, 1, 2])
async def test_502_503_retried_up_to_attempts_then_the_last_answer_is_delivered(
        attempts: int) -> None:
    script = [reply(502 if n % 2 == 0 else 503, f"answer {n}".encode()) for n in range(4)]
    fleet = Fleet(answers(*script))
    model = await model_of(fleet, "a", "b", "c", "d",
                           retries=f"{{attempts: {attempts}, backoff: 1ms, max_backoff: 1ms}}")
    outcome = Outcome()
    status, body = await forward(model, outbound(), outcome, read_all)
    assert len(fleet.asked) == attempts + 1
    assert len(set(fleet.names)) == attempts + 1  # each retry on another backend
    assert (status, body) == (script[attempts].status, f"answer {attempts}".encode())
    assert outcome.status == outcome.attempt_status == status
    assert outcome.retries == attempts
    assert outcome.retried_from == tuple(Fleet.key(n) for n in fleet.names[:-1])
    assert outcome.backend == Fleet.key(fleet.names[-1])
    for name in fleet.names:
        assert endpoint(model, name).health.consecutive_failures == 1
    assert_idle(model)


async def test_502_retry_stops_when_no_other_backend_is_up() -> None:
    fleet = Fleet(answers(reply(502, b"bad gateway"), reply(200)))
    model = await model_of(fleet, "a", "b")
    mark_down(endpoint(model, "b"))
    outcome = Outcome()
    assert await forward(model, outbound(), outcome, read_all) == (502, b"bad gateway")
    assert fleet.names == ["a"]
    assert outcome.retries == 0
    assert_idle(model)


@pytest.mark.parametrize("status", [500, 504])
async def test_500_504_delivered_without_retry_and_counted_as_failures(status: int) -> None:
    fleet = Fleet(answers(reply(status, b"engine error")))
    model = await model_of(fleet, "a", "b")
    outcome = Outcome()
    assert await forward(model, outbound(), outcome, read_all) == (status, b"engine error")
    [asked] = fleet.names
    assert endpoint(model, asked).health.consecutive_5xx == 1
    assert endpoint(model, asked).health.last_error == f"status {status}"
    assert outcome.status == outcome.attempt_status == status
    assert (outcome.retries, outcome.retried_from) == (0, ())
    assert outcome.backend == Fleet.key(asked)
    assert outcome.attempt_error is None
    assert outcome.t_sent > 0
    assert outcome.queue_wait == 0
    assert_idle(model)


async def test_first_byte_timeout_is_not_retried() -> None:
    gate = Gate()  # never opened: the engine is "working on it"
    fleet = Fleet(gate)
    model = await model_of(fleet, "a", "b", extra="timeouts: {first_byte: 30ms}")
    outcome = Outcome()
    trace = TraceStub()
    with pytest.raises(BackendTimeout):
        await forward(model, outbound(), outcome, read_all, trace=trace)
    [(asked, request)] = fleet.asked
    assert request.aborted
    assert outcome.attempt_error == "backend_timeout"
    assert outcome.attempt_status == 0
    assert outcome.retries == 0
    assert outcome.backend == Fleet.key(asked)
    assert outcome.t_sent > 0
    assert endpoint(model, asked).health.consecutive_failures == 1
    assert trace.calls == [("attempt", Fleet.key(asked), 0), ("ended", 0, "backend_timeout")]
    assert_idle(model)


@pytest.mark.parametrize("status", [400, 404, 422, 429])
async def test_4xx_delivered_at_once_and_counts_as_success(status: int) -> None:
    fleet = Fleet(answers(reply(status, b"client error")))
    model = await model_of(fleet, "a", "b")
    outlier = OutlierDetection()
    for ep in model.cluster.endpoints:
        ep.health.request_failed("earlier", outlier)
    outcome = Outcome()
    assert await forward(model, outbound(), outcome, read_all) == (status, b"client error")
    [asked] = fleet.names
    assert endpoint(model, asked).health.consecutive_failures == 0
    assert outcome.status == status
    assert outcome.retries == 0
    assert_idle(model)


@pytest.mark.parametrize("failure", [
    pytest.param(lambda: answers(reply(500)), id="status-500"),
    pytest.param(lambda: answers(BackendUnavailable("connection refused")), id="connect"),
])
async def test_outlier_ejection_after_consecutive_failures(
        failure: Callable[[], Handler]) -> None:
    fleet = Fleet()
    fleet.on("a", failure())
    snap = await snapshot_of(model_yaml(
        "a", "b", defaults="outlier_detection: {consecutive_failures: 2, consecutive_5xx: 2, "
                           "ejection: 60s}"), fleet)
    model = snap.models["m"]
    a = endpoint(model, "a")
    sent = 0
    while not a.health.ejected:
        sent += 1
        assert sent <= 10, "a was never ejected"
        try:
            await forward(model, outbound(), Outcome(), read_all)
        except BackendUnavailable:
            pytest.fail("a connect failure must have been retried on b")
    assert a.health.consecutive_5xx == 2
    assert not a.up
    assert a.health.state == "ejected"
    assert len(fleet.requests("a")) == 2
    for _ in range(6):
        outcome = Outcome()
        assert await forward(model, outbound(), outcome, read_all) == (200, b'{"ok":true}')
        assert outcome.backend == B
    assert len(fleet.requests("a")) == 2  # no traffic since the ejection
    assert_idle(model)


async def test_no_healthy_backend_when_none_is_up() -> None:
    fleet = Fleet()
    model = await model_of(fleet, "a", "b")
    for ep in model.cluster.endpoints:
        mark_down(ep)
    with pytest.raises(NoHealthyBackend) as caught:
        await forward(model, outbound(), Outcome(), read_all)
    assert caught.value.status == 503
    assert caught.value.headers["retry-after"] == "1"
    assert fleet.asked == []
    assert_idle(model)


async def test_no_healthy_backend_names_the_end_of_the_ejection() -> None:
    fleet = Fleet(answers(reply(503)))
    snap = await snapshot_of(model_yaml(
        "a", defaults="outlier_detection: {consecutive_failures: 1, ejection: 42s, "
                      "max_ejection_percent: 100, panic_threshold: 0}"), fleet)
    model = snap.models["m"]
    assert (await forward(model, outbound(), Outcome(), read_all))[0] == 503
    with pytest.raises(NoHealthyBackend) as caught:
        await forward(model, outbound(), Outcome(), read_all)
    assert caught.value.headers["retry-after"] == "42"
    assert len(fleet.asked) == 1
    assert_idle(model)


# -- the lease and the upstream response are given back on every path -------------------------
async def test_body_not_read_by_deliver_is_aborted() -> None:
    fleet = Fleet(answers(reply(200, [b"data: 1\n\n", 30.0, b"data: [DONE]\n\n"])))
    model = await model_of(fleet, "a")
    assert await forward(model, outbound(), Outcome(), status_only) == 200
    [request] = fleet.requests("a")
    assert request.aborted
    assert_idle(model)


async def test_body_read_by_deliver_is_not_aborted() -> None:
    fleet = Fleet(answers(reply(200, [b"data: 1\n\n", 0.001, b"data: [DONE]\n\n"])))
    model = await model_of(fleet, "a")
    status, body = await forward(model, outbound(), Outcome(), read_all)
    assert (status, body) == (200, b"data: 1\n\ndata: [DONE]\n\n")
    [request] = fleet.requests("a")
    assert not request.aborted
    assert_idle(model)


async def test_retried_502_still_streaming_is_aborted() -> None:
    fleet = Fleet(answers(reply(502, [b"partial", 30.0, b"rest"]), reply(200)))
    model = await model_of(fleet, "a", "b")
    assert (await forward(model, outbound(), Outcome(), read_all))[0] == 200
    (_, first), (_, second) = fleet.asked
    assert first.aborted
    assert not second.aborted
    assert_idle(model)


async def test_exception_inside_deliver_releases_and_aborts() -> None:
    fleet = Fleet(answers(reply(200, [b"x", 30.0, b"y"])))
    model = await model_of(fleet, "a")

    async def deliver(response: Response, capture: Capture | None) -> None:
        raise RuntimeError("client write failed")

    with pytest.raises(RuntimeError, match="client write failed"):
        await forward(model, outbound(), Outcome(), deliver)
    [request] = fleet.requests("a")
    assert request.aborted
    assert_idle(model)


async def test_cancelled_while_waiting_for_the_first_byte() -> None:
    gate = Gate()
    fleet = Fleet(gate)
    model = await model_of(fleet, "a", "b")
    trace = TraceStub()
    task = asyncio.create_task(forward(model, outbound(), Outcome(), read_all, trace=trace))
    await gate.arrived.wait()
    assert model.cluster.in_flight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [request] = gate.requests
    assert request.aborted
    assert len(fleet.asked) == 1  # a client that left is not retried
    assert trace.calls[-1] == ("ended", 0, None)
    assert_idle(model)


async def test_cancelled_while_relaying_the_body() -> None:
    fleet = Fleet(answers(reply(200, [b"data: 1\n\n", 30.0, b"data: 2\n\n"])))
    model = await model_of(fleet, "a")
    relaying = asyncio.Event()
    chunks: list[bytes] = []

    async def deliver(response: Response, capture: Capture | None) -> Any:
        async for chunk in response.iter_chunks():
            chunks.append(chunk)
            relaying.set()

    task = asyncio.create_task(forward(model, outbound(), Outcome(), deliver))
    await relaying.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert chunks == [b"data: 1\n\n"]
    [request] = fleet.requests("a")
    assert request.aborted
    assert_idle(model)


async def test_client_leaving_during_a_retry_is_recorded_as_499() -> None:
    gate = Gate()
    fleet = Fleet(answers(reply(502), gate))
    model = await model_of(fleet, "a", "b")
    record = Record(method="POST", path="/v1/chat/completions", headers={}, group="chat",
                    operation="chat", request_id="r", t0=perf_counter(), bytes_in=0)
    task = asyncio.create_task(forward(model, outbound(), record.outcome, read_all))
    await gate.arrived.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError) as caught:
        await task
    assert_idle(model)
    record.ended(caught.value)
    assert record.status == CLIENT_CLOSED


# -- the queue --------------------------------------------------------------------------------
async def test_second_request_waits_for_the_slot_and_gets_it() -> None:
    gate = Gate(reply(200, b"first"))
    fleet = Fleet(answers(gate, reply(200, b"second")))
    model = await model_of(fleet, "a", extra="max_in_flight: 1")
    first, second = Outcome(), Outcome()
    t1 = asyncio.create_task(forward(model, outbound(), first, read_all))
    await gate.arrived.wait()
    t2 = asyncio.create_task(forward(model, outbound(), second, read_all))
    await until(lambda: len(model.cluster.waiters) == 1)
    assert len(fleet.asked) == 1
    gate.open()
    assert await t1 == (200, b"first")
    assert await t2 == (200, b"second")
    assert first.queue_wait == 0
    assert second.queue_wait > 0
    assert not second.queue_rejected
    assert second.backend == A
    assert_idle(model)


async def test_full_queue_raises_queue_timeout_at_once() -> None:
    gate = Gate()
    fleet = Fleet(answers(gate, reply(200)))
    model = await model_of(fleet, "a", extra="max_in_flight: 1\nqueue: {size: 1, timeout: 30s}")
    t1 = asyncio.create_task(forward(model, outbound(), Outcome(), read_all))
    await gate.arrived.wait()
    t2 = asyncio.create_task(forward(model, outbound(), Outcome(), read_all))
    await until(lambda: len(model.cluster.waiters) == 1)
    rejected = Outcome()
    with pytest.raises(QueueTimeout) as caught:
        await forward(model, outbound(), rejected, read_all)
    assert caught.value.status == 429
    assert "queue is full" in caught.value.message
    assert rejected.queue_rejected
    assert rejected.backend == ""
    gate.open()
    await asyncio.gather(t1, t2)
    assert len(fleet.asked) == 2
    assert_idle(model)


async def test_queue_timeout_when_no_backend_frees_up() -> None:
    gate = Gate()
    fleet = Fleet(gate)
    model = await model_of(fleet, "a", extra="max_in_flight: 1\nqueue: {size: 4, timeout: 20ms}")
    t1 = asyncio.create_task(forward(model, outbound(), Outcome(), read_all))
    await gate.arrived.wait()
    waited = Outcome()
    with pytest.raises(QueueTimeout, match="no backend freed up in time"):
        await forward(model, outbound(), waited, read_all)
    assert waited.queue_rejected
    assert waited.queue_wait >= 0.015  # the wait it was refused after is reported
    gate.open()
    await t1
    assert len(fleet.asked) == 1
    assert_idle(model)


async def test_freed_slot_reaches_a_waiter_that_can_use_it() -> None:
    gate_a, gate_b = Gate(), Gate()
    fleet = Fleet()
    fleet.on("a", answers(gate_a, reply(200, b"a again")))
    fleet.on("b", answers(gate_b, reply(200, b"b again")))
    snap = await snapshot_of("""
        models:
          m:
            backends:
              - {url: "http://a:8000", max_in_flight: 1}
              - {url: "http://b:8000", max_in_flight: 1}
            endpoints: [chat]
            queue: {size: 8, timeout: 5s}
    """, fleet)
    model = snap.models["m"]
    holders = [asyncio.create_task(forward(model, outbound(), Outcome(), read_all))
               for _ in range(2)]
    await gate_a.arrived.wait()
    await gate_b.arrived.wait()
    # A retrying request (a already tried) queues first, a fresh request after it.
    retrying = asyncio.create_task(forward(model, outbound(), Outcome(), read_all,
                                           tried={endpoint(model, "a")}))
    await until(lambda: len(model.cluster.waiters) == 1)
    fresh_outcome = Outcome()
    fresh = asyncio.create_task(forward(model, outbound(), fresh_outcome, read_all))
    await until(lambda: len(model.cluster.waiters) == 2)
    gate_a.open()  # a frees up: the fresh request can take it, the retrying one cannot
    try:
        await until(lambda: len(fleet.requests("a")) == 2, timeout=0.3)
    finally:
        gate_b.open()
        results = await asyncio.gather(*holders, retrying, fresh)
        assert_idle(model)
    assert results[3] == (200, b"a again")
    assert fresh_outcome.backend == A


# -- the trace hook -----------------------------------------------------------------------------
async def test_trace_sees_each_attempt_and_its_end() -> None:
    fleet = Fleet(answers(BackendUnavailable("refused"), reply(502), reply(200)))
    model = await model_of(fleet, "a", "b", "c")
    trace = TraceStub()
    await forward(model, outbound(), Outcome(), read_all, trace=trace)
    first, second, third = (Fleet.key(n) for n in fleet.names)
    assert trace.calls == [
        ("attempt", first, 0), ("ended", 0, "backend_unavailable"),
        ("attempt", second, 1), ("ended", 502, None),
        ("attempt", third, 2), ("ended", 200, None),
    ]
    for number, (_, request) in enumerate(fleet.asked):
        assert request.header("traceparent") == f"00-{'a' * 32}-{number + 1:016x}-01"


# -- the placement hook -------------------------------------------------------------------------
async def test_placement_prefer_is_tried_first() -> None:
    fleet = Fleet()
    model = await model_of(fleet, "a", "b")
    placement = PlacementStub(prefer=B)
    await forward(model, outbound(), Outcome(), read_all, placement=placement)
    assert fleet.names == ["b"]
    assert placement.passed == [(200, True)]
    assert placement.answered_by == [(B, 200)]
    assert_idle(model)


async def test_placement_prefer_down_falls_back_to_the_balancer() -> None:
    fleet = Fleet()
    model = await model_of(fleet, "a", "b")
    mark_down(endpoint(model, "b"))
    placement = PlacementStub(prefer=B)
    await forward(model, outbound(), Outcome(), read_all, placement=placement)
    assert fleet.names == ["a"]
    assert placement.answered_by == [(A, 200)]


async def test_placement_passes_move_to_the_next_endpoint() -> None:
    fleet = Fleet()
    fleet.on("b", answers(reply(404, b"not mine")))
    fleet.on("a", answers(reply(200, b"mine")))
    model = await model_of(fleet, "a", "b")
    placement = PlacementStub(prefer=B)
    given: list[object] = []

    async def deliver(response: Response, capture: Capture | None) -> Any:
        given.append(capture)
        return await read_captured(response, capture)

    outcome = Outcome()
    assert await forward(model, outbound(), outcome, deliver, placement=placement) == (
        200, b"mine")
    assert fleet.names == ["b", "a"]
    assert placement.passed == [(404, True), (200, False)]
    assert placement.answered_by == [(A, 200)]
    assert given == [placement.capture]
    assert given[0] is placement.capture
    assert placement.seen == [b"mine"]
    assert outcome.backend == A
    assert outcome.status == 200
    assert not fleet.requests("b")[0].aborted  # the 404 was read to its end
    assert endpoint(model, "b").health.consecutive_failures == 0
    assert_idle(model)


async def test_placement_not_here_when_no_endpoint_is_left() -> None:
    fleet = Fleet(answers(reply(404, b"not mine")))
    model = await model_of(fleet, "a", "b")
    placement = PlacementStub()
    tried: set[Endpoint] = set()
    with pytest.raises(NotHere):
        await forward(model, outbound(), Outcome(), read_all, placement=placement, tried=tried)
    assert sorted(fleet.names) == ["a", "b"]
    assert placement.passed == [(404, True), (404, False)]
    assert placement.answered_by == []
    assert tried == set(model.cluster.endpoints)
    assert_idle(model)


async def test_placement_prefer_skips_an_endpoint_already_tried() -> None:
    fleet = Fleet()
    model = await model_of(fleet, "a", "b")
    placement = PlacementStub(prefer=A)
    await forward(model, outbound(), Outcome(), read_all, placement=placement,
                  tried={endpoint(model, "a")})
    assert fleet.names == ["b"]
