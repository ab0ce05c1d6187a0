"""``discover: true``: the LoRA adapters each engine's ``/v1/models`` lists with the model
as parent are routed, each only to the backends that list it now (socket-free, through the
health checker's reads and a built snapshot)."""

from __future__ import annotations

import gc
import logging
import weakref
from typing import Any

import orjson
import pytest

from router.config import ConfigError, HealthChecks
from router.discovery import Resolver
from router.endpoint import Endpoint, EndpointRegistry
from router.errors import NoHealthyBackend
from router.health import HealthBoard, HealthChecker, ListedAdapter, parse_listing
from router.snapshot import Snapshot, build
from router.tenants.config import hash_key, new_key
from router.upstream_mock import MockReply, MockRequest, MockTransport
from tests.unit.fleet_core import NO_EJECTION, routes

CHECKS = HealthChecks(timeout=0.5)


class Engine:
    """A scripted vLLM: serves ``base`` and the LoRA adapters in ``loras`` (of ``base``)."""

    def __init__(self, base: str, *loras: str) -> None:
        self.base = base
        self.loras = list(loras)
        self.model_reads = 0
        self.health = 200

    def __call__(self, request: MockRequest) -> MockReply:
        if request.target.endswith("/v1/models"):
            self.model_reads += 1
            cards = [{"id": self.base, "object": "model", "root": self.base, "parent": None},
                     *({"id": n, "object": "model", "root": f"/loras/{n}", "parent": self.base}
                       for n in self.loras)]
            return MockReply(200, [(b"content-type", b"application/json")],
                             [orjson.dumps({"object": "list", "data": cards})])
        return MockReply(self.health, [], [b""])


def spec(**model: Any) -> dict[str, Any]:
    return {"defaults": {"endpoints": ["chat"]},
            "models": {"qwen": {"backends": [{"url": "http://a:8000", "name": "a"},
                                             {"url": "http://b:8000", "name": "b"}],
                                "backend_model": "Qwen/Qwen3", "discover": True,
                                "endpoints": ["chat", "completions"], **model}}}


class Fleet:
    """Two scripted engines behind one snapshot, and the health checker that reads them."""

    def __init__(self, a: Engine, b: Engine) -> None:
        self.engines = {"a": a, "b": b}
        self.registry = EndpointRegistry(
            transports=lambda origin: MockTransport(self.engines[origin.host]),
            board=HealthBoard())
        self.checker = HealthChecker(self.registry.board,
                                     lambda: list(self.registry.by_key.values()),
                                     lambda: (CHECKS, NO_EJECTION))
        self.snap: Snapshot

    async def load(self, text: dict[str, Any]) -> Snapshot:
        self.snap = await build(routes(text), self.registry, Resolver())
        return self.snap

    def endpoint(self, host: str) -> Endpoint:
        return self.registry.by_key[f"http://{host}:8000"]

    async def check(self) -> None:
        for endpoint in list(self.registry.by_key.values()):
            await self.checker.check(endpoint)

    def holders(self, adapter: str) -> list[str]:
        return [m.name for m in self.snap.adapters[adapter].cluster.members]


def listed(snap: Snapshot) -> list[dict[str, Any]]:
    cards: list[dict[str, Any]] = orjson.loads(snap.models_body)["data"]
    return cards


def test_an_engine_listing_names_the_adapters_by_their_parent() -> None:
    body = orjson.dumps({"data": [
        {"id": "Qwen/Qwen3", "root": "Qwen/Qwen3", "parent": None},
        {"id": "sql", "root": "/loras/sql", "parent": "Qwen/Qwen3"},
        {"id": "alias", "parent": ""}, {"id": "odd", "parent": "Qwen/Qwen3", "root": 3}]})
    listing = parse_listing(body)
    assert listing is not None
    assert listing.ids == {"Qwen/Qwen3", "sql", "alias", "odd"}
    assert listing.adapters == {"sql": ListedAdapter("Qwen/Qwen3", "/loras/sql"),
                                "odd": ListedAdapter("Qwen/Qwen3", None)}
    assert parse_listing(b'{"data": [{"id": 1}]}') is None
    assert parse_listing(b"not json") is None


async def test_an_adapter_is_routed_only_to_the_backends_that_list_it() -> None:
    fleet = Fleet(Engine("Qwen/Qwen3", "sql"), Engine("Qwen/Qwen3"))
    snap = await fleet.load(spec())
    assert snap.adapters == {}  # nothing read yet
    await fleet.check()
    adapter = snap.adapters["sql"]
    assert fleet.holders("sql") == ["a"]
    assert (adapter.parent, adapter.groups, adapter.backend_model) == (
        "qwen", frozenset({"chat", "completions"}), None)
    for _ in range(4):
        picked = adapter.cluster.try_acquire(None, set())
        assert picked is fleet.endpoint("a")
        adapter.cluster.release(picked)
    # The base model keeps both backends, and its pick is unchanged.
    assert {m.name for m in snap.models["qwen"].cluster.routable} == {"a", "b"}
    assert listed(snap)[1] == {"id": "sql", "object": "model", "created": int(snap.loaded_at),
                               "owned_by": "routeyard", "root": "/loras/sql",
                               "parent": "qwen"}


async def test_loading_and_unloading_show_at_the_next_check() -> None:
    a, b = Engine("Qwen/Qwen3", "sql"), Engine("Qwen/Qwen3")
    fleet = Fleet(a, b)
    snap = await fleet.load(spec())
    await fleet.check()
    sql = snap.adapters["sql"]
    b.loras.append("sql")
    await fleet.check()
    assert fleet.holders("sql") == ["a", "b"]
    assert snap.adapters["sql"] is sql  # the same cluster, its members changed
    picks = set()
    for _ in range(4):
        picked = sql.cluster.try_acquire(None, set())
        assert picked is not None
        picks.add(picked)
        sql.cluster.release(picked)
    assert picks == {fleet.endpoint("a"), fleet.endpoint("b")}
    a.loras.remove("sql")
    await fleet.check()
    assert fleet.holders("sql") == ["b"]
    b.loras.remove("sql")
    await fleet.check()
    assert "sql" not in snap.adapters
    assert [c["id"] for c in listed(snap)] == ["qwen"]
    assert sql.cluster.try_acquire(None, set()) is None and not sql.cluster.any_up()


async def test_a_discovering_model_reads_the_models_at_every_check() -> None:
    a, b = Engine("Qwen/Qwen3"), Engine("Qwen/Qwen3")
    fleet = Fleet(a, b)
    await fleet.load(spec())
    for _ in range(3):
        await fleet.check()
    assert (a.model_reads, b.model_reads) == (3, 3)
    await fleet.load(spec(discover=False))  # back to every MODELS_EVERY-th check
    for _ in range(3):
        await fleet.check()
    assert a.model_reads == 3  # nothing amiss, names unchanged: /health alone again


async def test_adapters_of_another_parent_and_a_configured_name_are_not_discovered(
        caplog: pytest.LogCaptureFixture) -> None:
    a = Engine("Qwen/Qwen3", "sql", "chat-model")
    fleet = Fleet(a, Engine("Other/Model", "poem"))
    text = spec()
    text["models"]["chat-model"] = {"backends": [{"url": "http://a:8000"}]}
    caplog.set_level(logging.WARNING, "routeyard.snapshot")
    snap = await fleet.load(text)
    await fleet.check()
    assert list(snap.adapters) == ["sql"]  # poem's parent is not Qwen/Qwen3
    assert snap.models["chat-model"].parent is None  # the configured model wins
    a.loras.append("more")
    await fleet.check()
    await fleet.check()
    warnings = [r.getMessage() for r in caplog.records if r.name == "routeyard.snapshot"]
    assert warnings == ["adapter chat-model of model qwen is not routed as an adapter: the "
                        "configured model of that name is"]


async def test_an_adapter_leaves_ejections_to_the_base_model() -> None:
    """The only backend holding an adapter may still be ejected by the base model's rules;
    no warning names an adapter that a backend does not list."""
    fleet = Fleet(Engine("Qwen/Qwen3", "sql"), Engine("Qwen/Qwen3"))
    snap = await fleet.load(spec())
    await fleet.check()
    a = fleet.endpoint("a")
    assert a.may_eject()  # one of two base backends out: within max_ejection_percent 50
    assert a.wanted_models() == {"Qwen/Qwen3"}
    assert snap.adapters["sql"].cluster.panic is False


async def test_a_keys_models_apply_to_adapter_names() -> None:
    key = new_key()
    fleet = Fleet(Engine("Qwen/Qwen3", "sql", "qwen-poem"), Engine("Qwen/Qwen3"))
    text = spec()
    text["auth"] = {"keys": [{"id": "k", "hash": hash_key(key), "models": ["qwen*"]}]}
    snap = await fleet.load(text)
    await fleet.check()
    assert snap.auth is not None
    tenant = snap.auth.authenticate(f"Bearer {key}", None)
    assert [c["id"] for c in orjson.loads(snap.models_body_for(tenant))["data"]] == [
        "qwen", "qwen-poem"]
    assert [c["id"] for c in listed(snap)] == ["qwen", "sql", "qwen-poem"]


def test_discover_needs_the_health_checks() -> None:
    text = spec()
    text["defaults"]["health_checks"] = {"enabled": False}
    with pytest.raises(ConfigError, match=r"models\.qwen\.discover: adapters are discovered "
                       "by the health checks"):
        routes(text)


async def test_an_old_snapshots_clusters_go_with_it() -> None:
    """No reference cycle through the adapters' callback: once nothing holds an old
    snapshot, its clusters leave the endpoints' cluster sets without a garbage collection
    (else every read would still rebuild their adapters, every freed slot wake them)."""
    fleet = Fleet(Engine("Qwen/Qwen3", "sql"), Engine("Qwen/Qwen3"))
    old = await fleet.load(spec())
    await fleet.check()
    clusters = [weakref.ref(old.models["qwen"].cluster), weakref.ref(old.adapters["sql"].cluster)]
    await fleet.load(spec(endpoints=["chat"]))
    gc.disable()
    try:
        del old
        assert [ref() for ref in clusters] == [None, None]
    finally:
        gc.enable()
    assert len(fleet.endpoint("a").clusters) == 2  # the new snapshot's base and sql


async def test_an_adapter_whose_backends_are_all_down_stays_listed_and_answers_503() -> None:
    a = Engine("Qwen/Qwen3", "sql")
    fleet = Fleet(a, Engine("Qwen/Qwen3"))
    snap = await fleet.load(spec())
    await fleet.check()
    a.health = 503
    for _ in range(CHECKS.unhealthy_threshold):
        await fleet.check()
    assert not fleet.endpoint("a").up
    sql = snap.adapters["sql"].cluster  # the engine's last list stands
    assert "sql" in [c["id"] for c in listed(snap)]
    with pytest.raises(NoHealthyBackend):
        await sql.acquire(None, set())
    a.health = 200
    await fleet.check()
    assert sql.try_acquire(None, set()) is fleet.endpoint("a")
