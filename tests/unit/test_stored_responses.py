"""router.stored_responses over MockTransport backends: the bounded id map, where creates
and follow-ups go (and what they teach the map), and lookups by id across models."""

from __future__ import annotations

from typing import Any

import pytest

from router.errors import NoHealthyBackend, ResponseNotFound
from router.record import Outcome
from router.relay import Capture, forward
from router.snapshot import ModelEntry
from router.stored_responses import (
    SCAN_BYTES,
    SCAN_CHUNKS,
    ResponseIds,
    forward_stored,
    response_id_in,
)
from router.upstream import Response
from tests.unit.core import (
    Fleet,
    answers,
    assert_idle,
    mark_down,
    model_lines,
    model_of,
    outbound,
    read_captured,
    reply,
    snapshot_of,
)

A, B, C = Fleet.key("a"), Fleet.key("b"), Fleet.key("c")
CREATED = b'{"id":"resp_new1","object":"response","status":"completed"}'


def create(body: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"model": "m", "input": "hi", **(body or {})}


# -- the map -------------------------------------------------------------------------------------
def test_response_ids_forget_the_least_recently_used_past_capacity() -> None:
    ids = ResponseIds(capacity=2)
    ids.remember("resp_1", "m", A)
    ids.remember("resp_2", "m", B)
    assert ids.lookup("resp_1") == ("m", A)  # used: now the most recent
    ids.remember("resp_3", "m", C)
    assert len(ids) == 2
    assert ids.lookup("resp_2") is None
    assert ids.lookup("resp_1") == ("m", A)
    assert ids.lookup("resp_3") == ("m", C)
    ids.remember("resp_1", "m", B)  # found elsewhere: moved, and most recent again
    ids.remember("resp_4", "m", A)
    assert len(ids) == 2
    assert ids.lookup("resp_3") is None
    assert ids.lookup("resp_1") == ("m", B)


def test_response_id_in_reads_the_first_id_near_the_start() -> None:
    assert response_id_in(b'{"id": "resp_ab-1_c", "previous": {"id":"resp_zz"}}') == "resp_ab-1_c"
    assert response_id_in(b'{"id":"msg_1","object":"response"}') is None
    assert response_id_in(b" " * SCAN_BYTES + b'{"id":"resp_late"}') is None


# -- creates -------------------------------------------------------------------------------------
async def test_create_learns_the_id_of_its_answer_from_the_body() -> None:
    fleet = Fleet(answers(reply(200, CREATED)))
    model = await model_of(fleet, "a", "b")
    ids = ResponseIds()
    placement = ids.placement("m", create())
    assert placement.prefer is None
    status, body = await forward(model, outbound(target="/v1/responses"), Outcome(),
                                 read_captured, placement=placement)
    assert (status, body) == (200, CREATED)
    [asked] = fleet.names
    assert ids.lookup("resp_new1") == ("m", Fleet.key(asked))
    assert len(ids) == 1
    assert_idle(model)


async def test_create_learns_the_id_from_the_first_stream_event() -> None:
    events = [
        b'event: response.created\ndata: {"type":"response.created","sequence_number":0,'
        b'"response":{"id":"resp_streamed","status":"in_progress"}}\n\n',
        0.001,
        b'event: response.completed\ndata: {"type":"response.completed",'
        b'"response":{"id":"resp_streamed","status":"completed"}}\n\n',
    ]
    fleet = Fleet(answers(reply(200, events)))
    model = await model_of(fleet, "a")
    ids = ResponseIds()
    await forward(model, outbound(target="/v1/responses"), Outcome(), read_captured,
                  placement=ids.placement("m", create({"stream": True})))
    assert ids.lookup("resp_streamed") == ("m", A)


@pytest.mark.parametrize(("at", "learned"), [(SCAN_CHUNKS - 1, True), (SCAN_CHUNKS, False)])
async def test_create_looks_for_the_id_in_the_first_chunks_only(at: int, learned: bool) -> None:
    chunks: list[bytes | float] = []
    for n in range(SCAN_CHUNKS + 1):
        chunks += [b'{"id":"resp_found"}' if n == at else b"data: {}\n\n", 0.001]
    fleet = Fleet(answers(reply(200, chunks)))
    model = await model_of(fleet, "a")
    ids = ResponseIds()
    await forward(model, outbound(target="/v1/responses"), Outcome(), read_captured,
                  placement=ids.placement("m", create({"stream": True})))
    assert (ids.lookup("resp_found") is not None) is learned


async def test_create_with_store_false_learns_nothing() -> None:
    fleet = Fleet(answers(reply(200, CREATED)))
    model = await model_of(fleet, "a")
    ids = ResponseIds()
    seen: list[Capture | None] = []

    async def deliver(response: Response, capture: Capture | None) -> tuple[int, bytes]:
        seen.append(capture)
        return await read_captured(response, capture)

    await forward(model, outbound(target="/v1/responses"), Outcome(), deliver,
                  placement=ids.placement("m", create({"store": False})))
    assert seen == [None]
    assert len(ids) == 0


async def test_create_answered_with_an_error_learns_nothing() -> None:
    fleet = Fleet(answers(reply(400, b'{"id":"resp_not_made","error":{}}')))
    model = await model_of(fleet, "a")
    ids = ResponseIds()
    status, _ = await forward(model, outbound(target="/v1/responses"), Outcome(),
                              read_captured, placement=ids.placement("m", create()))
    assert status == 400
    assert len(ids) == 0


# -- follow-ups (previous_response_id) -----------------------------------------------------------
async def test_follow_up_goes_first_to_the_backend_that_holds_the_previous_answer() -> None:
    fleet = Fleet(answers(reply(200, CREATED)))
    model = await model_of(fleet, "a", "b", "c")
    ids = ResponseIds()
    ids.remember("resp_prev", "m", B)
    placement = ids.placement("m", create({"previous_response_id": "resp_prev"}))
    assert placement.prefer == B
    await forward(model, outbound(target="/v1/responses"), Outcome(), read_captured,
                  placement=placement)
    assert fleet.names == ["b"]
    assert ids.lookup("resp_prev") == ("m", B)
    assert ids.lookup("resp_new1") == ("m", B)
    assert_idle(model)


async def test_follow_up_404_from_the_remembered_backend_moves_on_and_remembers() -> None:
    fleet = Fleet()
    fleet.on("b", answers(reply(404, b'{"error":{"message":"not found"}}')))
    fleet.on("a", answers(reply(200, CREATED)))
    model = await model_of(fleet, "a", "b")
    ids = ResponseIds()
    ids.remember("resp_prev", "m", B)  # b restarted and forgot it; a holds it
    outcome = Outcome()
    status, body = await forward(
        model, outbound(target="/v1/responses"), outcome, read_captured,
        placement=ids.placement("m", create({"previous_response_id": "resp_prev"})))
    assert (status, body) == (200, CREATED)
    assert fleet.names == ["b", "a"]
    assert outcome.backend == A
    assert ids.lookup("resp_prev") == ("m", A)
    assert ids.lookup("resp_new1") == ("m", A)
    assert_idle(model)


async def test_follow_up_about_an_unknown_id_asks_until_found() -> None:
    fleet = Fleet(answers(reply(404, b"{}"), reply(200, CREATED)))
    model = await model_of(fleet, "a", "b")
    ids = ResponseIds()
    placement = ids.placement("m", create({"previous_response_id": "resp_elsewhere"}))
    assert placement.prefer is None
    await forward(model, outbound(target="/v1/responses"), Outcome(), read_captured,
                  placement=placement)
    first, second = fleet.names
    assert first != second
    assert ids.lookup("resp_elsewhere") == ("m", Fleet.key(second))


async def test_follow_up_that_no_backend_holds_gets_the_last_404() -> None:
    fleet = Fleet(answers(reply(404, b'{"error":"gone"}')))
    model = await model_of(fleet, "a", "b")
    ids = ResponseIds()
    status, body = await forward(
        model, outbound(target="/v1/responses"), Outcome(), read_captured,
        placement=ids.placement("m", create({"previous_response_id": "resp_gone"})))
    assert (status, body) == (404, b'{"error":"gone"}')
    assert sorted(fleet.names) == ["a", "b"]
    assert len(ids) == 0
    assert_idle(model)


def test_follow_up_ignores_a_holder_remembered_for_another_model() -> None:
    ids = ResponseIds()
    ids.remember("resp_prev", "other", B)
    assert ids.placement("m", create({"previous_response_id": "resp_prev"})).prefer is None
    assert ids.placement("m", create({"previous_response_id": 7})).asked_about is None


# -- lookups by id (GET /v1/responses/{id}, cancel) ----------------------------------------------
async def two_models(fleet: Fleet, m1: list[str], m2: list[str]) -> tuple[ModelEntry, ModelEntry]:
    text = "\n".join(["models:", *model_lines("m1", m1), *model_lines("m2", m2)]) + "\n"
    snap = await snapshot_of(text, fleet)
    return snap.models["m1"], snap.models["m2"]


class Lookup:
    """One ``forward_stored`` call's deliveries and ``matched`` models."""

    def __init__(self) -> None:
        self.delivered: list[tuple[int, bytes]] = []
        self.matched: list[str] = []
        self.outcome = Outcome(reads_usage=False)

    async def deliver(self, response: Response, capture: Capture | None) -> None:
        self.delivered.append((response.status, await response.read()))

    def match(self, model: ModelEntry) -> None:
        self.matched.append(model.name)

    async def run(self, ids: ResponseIds, response_id: str, models: list[ModelEntry]) -> None:
        await forward_stored(response_id, ids.holders(response_id, models), ids,
                             outbound(method="GET", target=f"/v1/responses/{response_id}",
                                      body=b""),
                             self.outcome, self.deliver, self.match)


async def test_lookup_across_models_sharing_backends_asks_each_backend_once() -> None:
    fleet = Fleet(answers(reply(404, b"{}")))
    fleet.on("c", answers(reply(200, b'{"id":"resp_x"}')))
    m1, m2 = await two_models(fleet, ["a", "b"], ["b", "c"])
    ids = ResponseIds()
    lookup = Lookup()
    await lookup.run(ids, "resp_x", [m1, m2])
    assert sorted(fleet.names) == ["a", "b", "c"]
    assert fleet.names[-1] == "c"
    assert lookup.matched == ["m1", "m2"]
    assert lookup.delivered == [(200, b'{"id":"resp_x"}')]
    assert ids.lookup("resp_x") == ("m2", C)
    assert_idle(m1, m2)


async def test_lookup_asks_the_remembered_holder_first() -> None:
    fleet = Fleet(answers(reply(200, b'{"id":"resp_x"}')))
    m1, m2 = await two_models(fleet, ["a", "b"], ["b", "c"])
    ids = ResponseIds()
    ids.remember("resp_x", "m2", C)
    lookup = Lookup()
    await lookup.run(ids, "resp_x", [m1, m2])
    assert fleet.names == ["c"]
    assert lookup.matched == ["m2"]


async def test_lookup_passes_over_a_model_whose_backends_are_all_down() -> None:
    fleet = Fleet(answers(reply(200, b'{"id":"resp_x"}')))
    m1, m2 = await two_models(fleet, ["a"], ["b"])
    mark_down(next(iter(m1.cluster.endpoints)))
    ids = ResponseIds()
    lookup = Lookup()
    await lookup.run(ids, "resp_x", [m1, m2])
    assert fleet.names == ["b"]
    assert lookup.matched == ["m1", "m2"]
    assert lookup.delivered == [(200, b'{"id":"resp_x"}')]
    assert ids.lookup("resp_x") == ("m2", B)
    assert_idle(m1, m2)


async def test_lookup_whose_last_model_is_down_raises_its_error() -> None:
    fleet = Fleet(answers(reply(404, b"{}")))
    m1, m2 = await two_models(fleet, ["a"], ["b"])
    mark_down(next(iter(m2.cluster.endpoints)))
    with pytest.raises(NoHealthyBackend):
        await Lookup().run(ResponseIds(), "resp_x", [m1, m2])
    assert fleet.names == ["a"]
    assert_idle(m1, m2)


async def test_lookup_delivers_the_last_404() -> None:
    fleet = Fleet(answers(reply(404, b'{"error":"not found"}')))
    m1, m2 = await two_models(fleet, ["a"], ["b"])
    ids = ResponseIds()
    lookup = Lookup()
    await lookup.run(ids, "resp_x", [m1, m2])
    assert fleet.names == ["a", "b"]
    assert lookup.delivered == [(404, b'{"error":"not found"}')]
    assert lookup.outcome.status == 404
    assert lookup.outcome.backend == B
    assert len(ids) == 0
    assert_idle(m1, m2)


async def test_lookup_remembers_a_holder_that_answers_another_4xx() -> None:
    fleet = Fleet(answers(reply(400, b'{"error":"cannot cancel a completed response"}')))
    m1, _ = await two_models(fleet, ["a"], ["b"])
    ids = ResponseIds()
    await Lookup().run(ids, "resp_x", [m1])
    assert ids.lookup("resp_x") == ("m1", A)


async def test_lookup_raises_response_not_found_when_nothing_is_left_to_ask() -> None:
    fleet = Fleet(answers(reply(404, b"{}")))
    m1, m2 = await two_models(fleet, ["a", "b"], ["b", "a"])
    lookup = Lookup()
    with pytest.raises(ResponseNotFound) as caught:
        await lookup.run(ResponseIds(), "resp_x", [m1, m2])
    assert caught.value.status == 404
    assert sorted(fleet.names) == ["a", "b"]  # m2's backends said 404 already, as m1's
    assert lookup.delivered == []
    with pytest.raises(ResponseNotFound):
        await Lookup().run(ResponseIds(), "resp_x", [])
    assert_idle(m1, m2)
