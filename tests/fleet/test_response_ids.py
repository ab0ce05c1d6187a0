"""Stored Responses API answers across three replicas, through the official SDK.

vLLM keeps a ``store``d answer in the engine that made it, so ``previous_response_id``,
``GET /v1/responses/{response_id}`` and ``POST /v1/responses/{response_id}/cancel`` only
work on that engine. With round robin over three engines, two of three follow-ups would
hit the wrong one without the router's response-id map (``router.response_ids``), and a
router that never saw the answer (another worker or replica) finds it by asking each
backend in turn.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import openai
import pytest

from tests.fleet.conftest import Engine, Fleet, model, routes
from tests.harness import Router, wait_until

RESPONSES = "/v1/responses"
#: The catalog's paths, named so docs/supported-apis.md lists this file for them.
CATALOG_PATHS = ("/v1/responses/{response_id}", "/v1/responses/{response_id}/cancel")


def responses_routes(fleet: Fleet, **spec: object) -> str:
    return routes({"m": model(*fleet.engines, endpoints=["responses", "chat"], **spec)})


def client(router: Router) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0)


def holder(fleet: Fleet, path: str = RESPONSES) -> list[Engine]:
    """The engines that received a request on ``path`` since the last reset."""
    return [e for e in fleet if e.count(path) > 0]


def engine_holding(fleet: Fleet, response_id: str) -> Engine:
    """The engine that stores ``response_id``, asked directly."""
    owners = [e for e in fleet
              if httpx.get(f"{e.url}/v1/responses/{response_id}").status_code == 200]
    assert len(owners) == 1, owners
    return owners[0]


def test_follow_ups_reach_the_engine_that_made_the_answer(
        fleet: Fleet, launch_router: Callable[[str], Router]) -> None:
    router = launch_router(responses_routes(fleet))
    sdk = client(router)
    first = sdk.responses.create(model="m", input="Hello", store=True)
    owner = engine_holding(fleet, first.id)
    for engine in fleet:
        engine.reset()
    made = []
    previous = first.id
    for turn in range(6):  # round robin alone would send 4 of these elsewhere
        answer = sdk.responses.create(model="m", input=f"turn {turn}",
                                      previous_response_id=previous)
        assert answer.previous_response_id == previous
        made.append(answer.id)
        previous = answer.id
    for _ in range(4):
        assert sdk.responses.retrieve(first.id).id == first.id
    retrieve = f"/v1/responses/{first.id}"
    assert [e.count(RESPONSES) for e in fleet] == [6 if e is owner else 0 for e in fleet]
    assert [e.count(retrieve) for e in fleet] == [4 if e is owner else 0 for e in fleet]
    assert all(engine_holding(fleet, rid) is owner for rid in made)


def test_streamed_answer_is_remembered_too(
        fleet: Fleet, launch_router: Callable[[str], Router]) -> None:
    router = launch_router(responses_routes(fleet))
    sdk = client(router)
    with sdk.responses.stream(model="m", input="Hello") as stream:
        final = stream.get_final_response()
    owner = engine_holding(fleet, final.id)
    for _ in range(3):
        sdk.responses.create(model="m", input="again", previous_response_id=final.id)
    assert [e for e in fleet if e.count(RESPONSES) > 0] == [owner]


def test_a_router_that_never_saw_the_answer_finds_it(
        fleet: Fleet, launch_router: Callable[[str], Router]) -> None:
    """Another worker or replica: its map is empty, so it asks each backend in turn, and
    remembers where it found the answer."""
    text = responses_routes(fleet)
    maker = client(launch_router(text))
    made = [maker.responses.create(model="m", input=f"q{i}").id for i in range(3)]
    owners = [engine_holding(fleet, rid) for rid in made]
    assert len(set(owners)) == 3  # round robin put one answer on each engine
    other_router = launch_router(text)
    other = client(other_router)
    for engine in fleet:
        engine.reset()
    for rid in reversed(made):  # an order the other router's round robin does not follow
        assert other.responses.retrieve(rid).id == rid
    probed = sum(e.count(f"/v1/responses/{rid}") for e in fleet for rid in made)
    assert probed > 3  # some backends were asked and said 404
    for engine in fleet:
        engine.reset()
    for rid in made:  # now remembered: straight to the owner, no probe
        other.responses.retrieve(rid)
    for rid, owner in zip(made, owners, strict=True):
        assert [e.count(f"/v1/responses/{rid}") for e in fleet] == [
            1 if e is owner else 0 for e in fleet]
    answer = other.responses.create(model="m", input="next", previous_response_id=made[0])
    assert answer.previous_response_id == made[0]
    assert engine_holding(fleet, answer.id) is owners[0]
    backends = httpx.get(f"{other_router.url}/admin/backends", timeout=10).json()
    assert all(b["in_flight"] == 0 for b in backends["m"]["backends"])


def test_answers_across_models_are_found(
        fleet: Fleet, launch_router: Callable[[str], Router]) -> None:
    """Two models on separate engines: an id is looked for under each model the client
    may use; a model whose backends were asked already is not asked again."""
    e = fleet.engines
    text = routes({"a": model(e[0], endpoints=["responses"]),
                   "b": model(e[1], e[2], endpoints=["responses"])})
    made = client(launch_router(text)).responses.create(model="b", input="Hello").id
    other = client(launch_router(text))
    for engine in fleet:
        engine.reset()
    assert other.responses.retrieve(made).id == made
    owner = engine_holding(fleet, made)
    assert owner in (e[1], e[2])


def test_cancel_reaches_the_right_engine(
        fleet: Fleet, launch_router: Callable[[str], Router]) -> None:
    router = launch_router(responses_routes(fleet))
    made = client(router).responses.create(model="m", input="Hello")
    r = httpx.post(f"{router.url}/v1/responses/{made.id}/cancel", timeout=10)
    # the fake engine, like vLLM, refuses to cancel an answer that finished synchronously:
    # a 400 from the owner, not a 404 from an engine that never saw it
    assert r.status_code == 400, r.text
    assert "synchronous" in r.json()["error"]["message"]


def test_unknown_and_invalid_ids(fleet: Fleet, launch_router: Callable[[str], Router]) -> None:
    router = launch_router(responses_routes(fleet))
    sdk = client(router)
    with pytest.raises(openai.NotFoundError) as info:
        sdk.responses.retrieve("resp_doesnotexist")
    assert "resp_doesnotexist" in info.value.message  # the engines' own 404, passed through
    assert all(e.count("/v1/responses/resp_doesnotexist") == 1 for e in fleet)  # each asked once
    with pytest.raises(openai.NotFoundError):
        sdk.responses.create(model="m", input="x", previous_response_id="resp_doesnotexist")
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.responses.retrieve("not-an-id")
    assert bad.value.param == "response_id"
    backends = httpx.get(f"{router.url}/admin/backends", timeout=10).json()
    assert all(b["in_flight"] == 0 for b in backends["m"]["backends"])


def test_a_key_reaches_only_answers_of_its_models(
        fleet: Fleet, launch_router: Callable[[str], Router],
        monkeypatch: pytest.MonkeyPatch) -> None:
    e = fleet.engines
    spec = {"a": model(e[0], endpoints=["responses"]),
            "b": model(e[1], endpoints=["responses"])}
    text = routes(spec)[:-2] + (
        ', "auth": {"keys": [{"id": "ka", "key_env": "RY_TEST_KA", "models": ["a"]}, '
        '{"id": "kb", "key_env": "RY_TEST_KB", "models": ["b"]}]}}\n')
    key_a, key_b = "a" * 40, "b" * 40
    monkeypatch.setenv("RY_TEST_KA", key_a)
    monkeypatch.setenv("RY_TEST_KB", key_b)
    router = launch_router(text)
    as_b = openai.OpenAI(base_url=f"{router.url}/v1", api_key=key_b, max_retries=0)
    as_a = openai.OpenAI(base_url=f"{router.url}/v1", api_key=key_a, max_retries=0)
    made = as_b.responses.create(model="b", input="secret").id
    assert as_b.responses.retrieve(made).id == made
    for engine in fleet:
        engine.reset()
    with pytest.raises(openai.NotFoundError):
        as_a.responses.retrieve(made)
    assert e[1].count(f"/v1/responses/{made}") == 0  # b's engine was never asked


def test_no_model_serving_responses_is_404(
        fleet: Fleet, launch_router: Callable[[str], Router]) -> None:
    router = launch_router(routes({"m": model(*fleet.engines, endpoints=["chat"])}))
    r = httpx.get(f"{router.url}/v1/responses/resp_x", timeout=10)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "response_not_found"
    assert all(e.count("/v1/responses/resp_x") == 0 for e in fleet)


def test_answers_of_a_dead_engine_are_gone(
        fleet: Fleet, launch_router: Callable[[str], Router]) -> None:
    """While the engine holding an answer is down, a retrieval is retried on the others
    (connection refused) and ends with their 404: the answer is in the dead engine's
    memory, and nothing waits for it."""
    router = launch_router(responses_routes(fleet))
    sdk = client(router)
    made = sdk.responses.create(model="m", input="Hello")
    owner = engine_holding(fleet, made.id)
    owner.kill()
    with pytest.raises(openai.NotFoundError) as info:
        sdk.responses.retrieve(made.id)
    assert made.id in info.value.message
    assert sdk.responses.create(model="m", input="fresh").id  # the others still serve


def test_retrievals_are_counted_but_not_their_tokens(
        fleet: Fleet, launch_router: Callable[[str], Router]) -> None:
    router = launch_router(responses_routes(fleet))
    sdk = client(router)
    made = sdk.responses.create(model="m", input="Hello")
    for _ in range(3):
        sdk.responses.retrieve(made.id)

    def sum_of(samples: dict, name: str, **labels: str) -> float:
        return sum(v for (n, have), v in samples.items()
                   if n == name and set(labels.items()) <= set(have))

    def counted() -> dict | None:
        # A scrape flushes this (only) worker first; a request is counted as it ends.
        samples = router.scrape()
        done = sum_of(samples, "routeyard_requests_total", model="m", group="responses")
        return samples if done >= 4 else None

    samples = wait_until(counted, 5, "the four requests are counted")
    assert sum_of(samples, "routeyard_requests_total", model="m", group="responses",
                  code="200") == 4  # one create, three retrievals
    output = sum_of(samples, "routeyard_tokens_total", type="output")
    assert output == made.usage.output_tokens  # the create's tokens, not counted again
