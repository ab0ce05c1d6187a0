"""router/snapshot.py and discovery.apply_limits: what a config load binds and freezes."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from router.config import ModelConfig
from router.discovery import Resolver, apply_limits
from router.endpoint import Member
from router.snapshot import KeyFunction, Snapshot, _key_function, build, prompt_prefix
from router.tenants.config import hash_key, new_key
from router.upstream import Timeouts
from router.upstream_mock import MockTransport
from tests.unit.fleet_core import endpoints, model_config, registry, routes

SPEC: dict[str, Any] = {
    "defaults": {
        "endpoints": ["chat"],
        "timeouts": {"connect": "250ms", "first_byte": "2m", "idle": "30s"},
        "outlier_detection": {"consecutive_failures": 2, "ejection": "5s"},
    },
    "models": {
        "chat-model": {
            "backends": [{"url": "http://a:8000", "weight": 3, "max_in_flight": 4},
                         {"url": "http://b:8000", "max_in_flight": 6}],
            "endpoints": ["completions", "chat"],
            "backend_model": "org/real-chat",
            "policy": "session",
            "retries": {"attempts": 4},
            "timeouts": {"idle": "1m"},
            "max_body_size": "1MiB",
        },
        "same-name": {
            "backends": [{"url": "http://b:8000", "max_in_flight": 2}],
            "backend_model": "same-name",
            "endpoints": ["embeddings"],
            "policy": "prefix",
            "prefix": {"chars": 8},
        },
    },
}


def transport(snap: Snapshot, model: str, index: int = 0) -> MockTransport:
    t = snap.models[model].cluster.endpoints[index].transport
    assert isinstance(t, MockTransport)
    return t


async def test_build_binds_every_model() -> None:
    config = routes(SPEC)
    snap = await build(config, registry(), Resolver())
    assert list(snap.models) == ["chat-model", "same-name"]
    chat, same = snap.models["chat-model"], snap.models["same-name"]
    assert chat.name == "chat-model"
    assert chat.groups == frozenset({"chat", "completions"})
    assert chat.enabled == ["chat", "completions"]
    assert chat.backend_model == "org/real-chat"
    assert same.backend_model is None  # equal to the name: nothing to rewrite
    assert same.groups == frozenset({"embeddings"})
    assert chat.timeouts == Timeouts(connect=0.25, first_byte=120.0, idle=60.0)
    assert same.timeouts == Timeouts(connect=0.25, first_byte=120.0, idle=30.0)
    assert chat.max_body_size == 1024 * 1024 and same.max_body_size == 32 * 1024 * 1024
    assert chat.retries.attempts == 4 and same.retries.attempts == 2
    assert chat.retries is config.models["chat-model"].retries
    for entry in (chat, same):
        assert entry.cluster.name == entry.name
        assert entry.cluster.outlier is config.outlier_detection
        assert (entry.cluster.outlier.consecutive_failures, entry.cluster.outlier.ejection) == (
            2, 5.0)
    assert [(m.endpoint.url, m.weight, m.max_in_flight) for m in chat.cluster.members] == [
        ("http://a:8000", 3, 4), ("http://b:8000", 1, 6)]
    assert chat.key_of is not None and same.key_of is not None
    assert snap.auth is None and snap.fingerprint == (config.sha256, None)
    assert snap.endpoint_keys() == {"http://a:8000", "http://b:8000"}


async def test_a_backend_shared_by_two_models_is_one_endpoint_with_the_smallest_limit() -> None:
    snap = await build(routes(SPEC), registry(), Resolver())
    chat, same = snap.models["chat-model"].cluster, snap.models["same-name"].cluster
    a, b = chat.endpoints
    assert same.endpoints == (b,)  # the same object: one in-flight count, one capacity
    assert a.max_in_flight == 4 and b.max_in_flight == 2
    assert set(b.clusters) == {chat, same}


def test_apply_limits_takes_the_smallest_declared_limit() -> None:
    reg = registry()
    e0, e1, e2 = endpoints(reg, 3)

    class Cluster:
        def __init__(self, *members: Member) -> None:
            self.members = members
            self.config = model_config()

    apply_limits([Cluster(Member(e0, 1, None), Member(e1, 1, 5), Member(e2, 1, None)),
                  Cluster(Member(e0, 1, 3), Member(e1, 1, 7), Member(e2, 1, None)),
                  Cluster(Member(e1, 1, None))])
    assert (e0.max_in_flight, e1.max_in_flight, e2.max_in_flight) == (3, 5, None)
    apply_limits([Cluster(Member(e0, 1, None))])  # a reload lifts the limit
    assert e0.max_in_flight is None


async def test_api_key_env_becomes_the_engine_authorization_header(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTEYARD_TEST_ENGINE_KEY", "engine-secret")
    spec = {"models": {"m": {"endpoints": ["chat"], "backends": [
        {"url": "http://a:8000", "api_key_env": "ROUTEYARD_TEST_ENGINE_KEY"},
        {"url": "http://b:8000"}]}}}
    snap = await build(routes(spec), registry(), Resolver())
    a, b = snap.models["m"].cluster.endpoints
    assert a.api_key_header == "authorization: Bearer engine-secret\r\n"
    assert b.api_key_header is None


async def test_endpoints_are_reused_across_builds_and_dropped_ones_closed() -> None:
    reg = registry()
    first = await build(routes(SPEC), reg, Resolver())
    old = first.models["chat-model"].cluster
    a, b = old.endpoints
    assert old.try_acquire("session-1", set()) is not None
    held = next(e for e in (a, b) if e.in_flight)
    spec = {"defaults": SPEC["defaults"], "models": {
        "chat-model": {"backends": [{"url": "http://a:8000"}, {"url": "http://b:8000"}]},
        "other": {"backends": [{"url": "http://c:8000"}]}}}
    second = await build(routes(spec), reg, Resolver())
    assert second.models["chat-model"].cluster.endpoints == (a, b)  # the same objects
    assert held.in_flight == 1  # the request in flight is still counted
    assert a.max_in_flight is None and b.max_in_flight is None  # the limits went away
    assert transport(first, "chat-model", 0).closed == 0
    third = await build(routes({"models": {"other": spec["models"]["other"]},
                                "defaults": SPEC["defaults"]}), reg, Resolver())
    assert set(reg.by_key) == {"http://c:8000"}
    assert a.transport.closed == 1 and b.transport.closed == 1  # type: ignore[attr-defined]
    assert transport(third, "other").closed == 0
    assert third.models["other"].cluster.endpoints[0] is second.models["other"].cluster.endpoints[0]
    old.release(held)  # the old request finishes on the old cluster
    assert held.in_flight == 0


async def test_models_body_lists_every_model() -> None:
    snap = await build(routes(SPEC), registry(), Resolver())
    created = int(snap.loaded_at)
    assert orjson.loads(snap.models_body) == {"object": "list", "data": [
        {"id": "chat-model", "object": "model", "created": created, "owned_by": "routeyard"},
        {"id": "same-name", "object": "model", "created": created, "owned_by": "routeyard"},
    ]}
    assert snap.models_body_for(None) is snap.models_body


async def test_models_body_for_a_tenant() -> None:
    spec = {**SPEC, "auth": {"keys": [
        {"id": "team-a-app", "tenant": "team-a", "hash": hash_key(new_key()),
         "models": ["chat-*"]},
        {"id": "team-a-batch", "tenant": "team-a", "hash": hash_key(new_key()),
         "models": ["nothing-yet"]},
        {"id": "ci", "hash": hash_key(new_key()), "models": ["*"]},
    ]}}
    snap = await build(routes(spec), registry(), Resolver())
    assert snap.auth is not None and snap.fingerprint[1] == snap.auth.fingerprint
    team_a, ci = snap.auth.tenants["team-a-app"], snap.auth.tenants["ci"]
    body = snap.models_body_for(team_a)
    assert [c["id"] for c in orjson.loads(body)["data"]] == ["chat-model"]
    assert snap.models_body_for(team_a) is body  # cached per key
    assert [c["id"] for c in orjson.loads(snap.models_body_for(ci))["data"]] == [
        "chat-model", "same-name"]
    empty = snap.auth.tenants["team-a-batch"]
    assert orjson.loads(snap.models_body_for(empty))["data"] == []


async def test_summary_names_backends_and_settings() -> None:
    snap = await build(routes(SPEC), registry(), Resolver())
    chat = snap.summary()["models"]["chat-model"]  # type: ignore[index]
    assert chat == {"backends": ["http://a:8000", "http://b:8000"],
                    "endpoints": ["chat", "completions"], "backend_model": "org/real-chat",
                    "policy": "session",
                    "timeouts": {"connect": 0.25, "first_byte": 120.0, "idle": 60.0},
                    "max_body_size": 1024 * 1024}


# -- balancing keys -----------------------------------------------------------------------
def key_of(config: ModelConfig) -> KeyFunction:
    function = _key_function(config)
    assert function is not None
    return function


def test_session_key_from_the_header_else_the_user() -> None:
    key = key_of(model_config(policy="session", session={"header": "X-Conversation"}))
    assert key({"x-conversation": "conv-1"}, {"user": "u"}) == "conv-1"
    assert key({}, {"user": "u-7"}) == "u-7"
    assert key({"x-conversation": ""}, {"user": "u-7"}) == "u-7"
    assert key({}, {}) is None
    assert key({}, {"user": 42}) is None


def test_prefix_key_reads_the_prompt_and_round_robin_has_none() -> None:
    key = key_of(model_config(policy="prefix", prefix={"chars": 5}))
    assert key({}, {"prompt": "Once upon a time"}) == "Once "
    assert key({}, {"prompt": ""}) is None
    assert _key_function(model_config(policy="round_robin")) is None
    assert _key_function(model_config(policy="least_request")) is None


def test_prefix_key_is_none_without_a_prompt() -> None:
    key = key_of(model_config(policy="prefix"))
    assert key({}, {"query": "what is a panda?", "documents": ["a bear", "a car"]}) is None


# -- prompt_prefix ------------------------------------------------------------------------
def test_prompt_prefix_of_chat_messages() -> None:
    body = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": "hi"}]}
    assert prompt_prefix(body, 100) == "system:be brief\nuser:hi\n"
    assert prompt_prefix(body, 10) == "system:be "
    many = {"messages": [{"role": "user", "content": "x" * 50}] * 1000}
    assert prompt_prefix(many, 20) == "user:" + "x" * 15


def test_prompt_prefix_of_chat_content_parts() -> None:
    body = {"messages": [
        {"role": "user", "content": [
            {"type": "text", "text": "look at "},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "text", "text": "this"}]},
        "not a message",
        {"role": "assistant", "content": None},
    ]}
    assert prompt_prefix(body, 100) == "user:look at this\nassistant:\n"


def test_prompt_prefix_of_completion_prompts() -> None:
    assert prompt_prefix({"prompt": "Once upon a time"}, 9) == "Once upon"
    assert prompt_prefix({"prompt": ["first prompt", "second"]}, 5) == "first"
    assert prompt_prefix({"prompt": [101, 2023, 2003]}, 100) == "[101, 2023, 2003]"
    assert prompt_prefix({"prompt": [101, 2023, 2003]}, 4) == "[101"
    assert prompt_prefix({"prompt": [[101, 2023], [7]]}, 100) == "[101, 2023]"
    # token ids are a stable key: the same ids, the same prefix; others differ
    ids = list(range(500))
    assert prompt_prefix({"prompt": ids}, 64) == prompt_prefix({"prompt": [*ids, 1]}, 64)
    assert prompt_prefix({"prompt": [1, 2]}, 64) != prompt_prefix({"prompt": [1, 3]}, 64)


def test_prompt_prefix_of_embedding_input() -> None:
    assert prompt_prefix({"input": "some text to embed"}, 9) == "some text"
    assert prompt_prefix({"input": ["a doc", "another"]}, 100) == "a doc"
    assert prompt_prefix({"input": [5, 6, 7]}, 100) == "[5, 6, 7]"
