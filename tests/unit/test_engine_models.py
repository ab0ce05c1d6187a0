"""The health checker asks each engine which models it serves (``EngineModels``); a model
whose engine does not serve the name it sends gets no requests there, until it does."""

from __future__ import annotations

import logging

import orjson
import pytest

from router.cluster import Cluster
from router.config import HealthChecks
from router.endpoint import Endpoint, EndpointRegistry, Member
from router.health import MODELS_EVERY, HealthBoard, HealthChecker
from router.upstream_mock import MockReply, MockRequest, MockTransport
from tests.unit.fleet_core import NO_EJECTION, model_config

CHECKS = HealthChecks(timeout=0.5)


class Engine:
    """A scripted engine: ``/health`` answers 200 (or ``health``), ``/v1/models`` lists
    ``models`` (or answers ``models_status``)."""

    def __init__(self, *models: str) -> None:
        self.models = list(models)
        self.health = 200
        self.models_status = 200
        self.asked: list[MockRequest] = []

    def __call__(self, request: MockRequest) -> MockReply:
        self.asked.append(request)
        if request.target.endswith("/v1/models"):
            body = orjson.dumps({"object": "list",
                                 "data": [{"id": m, "object": "model"} for m in self.models]})
            return MockReply(self.models_status, [(b"content-type", b"application/json")],
                             [body])
        return MockReply(self.health, [], [b""])

    def model_reads(self) -> int:
        return sum(1 for r in self.asked if r.target.endswith("/v1/models"))


def setup(engine: Engine, *models: tuple[str, str | None],
          ) -> tuple[HealthChecker, Endpoint, dict[str, Cluster], EndpointRegistry]:
    """One endpoint on ``engine`` shared by ``models`` ((name, backend_model) each)."""
    reg = EndpointRegistry(transports=lambda origin: MockTransport(engine), board=HealthBoard())
    endpoint = reg.get("http://e0:8000")
    clusters = {}
    for name, backend_model in models:
        fields = {"backend_model": backend_model} if backend_model else {}
        clusters[name] = Cluster(model_config(name, **fields), [Member(endpoint, 1)],
                                 NO_EJECTION)
    checker = HealthChecker(reg.board, lambda: list(reg.by_key.values()),
                            lambda: (CHECKS, NO_EJECTION))
    return checker, endpoint, clusters, reg


def view(cluster: Cluster) -> dict[str, object]:
    (backend,) = cluster.describe()
    return backend


async def test_a_model_the_engine_does_not_serve_is_out_for_that_model_only(
        caplog: pytest.LogCaptureFixture) -> None:
    engine = Engine("chat-model", "lora-a")
    checker, endpoint, clusters, _ = setup(engine, ("chat", "chat-model"), ("sql", "lora-b"))
    caplog.set_level(logging.INFO, "routeyard.health")
    await checker.check(endpoint)
    chat, sql = clusters["chat"], clusters["sql"]
    assert chat.any_up() and chat.try_acquire(None, set()) is endpoint
    assert not sql.any_up() and sql.try_acquire(None, set()) is None
    reason = "model lora-b not served (engine serves: chat-model, lora-a)"
    assert view(sql) | {"state": "unhealthy", "up": False, "last_error": reason,
                        "model_served": False} == view(sql)
    assert view(chat)["state"] == "healthy" and view(chat)["model_served"] is True
    assert endpoint.health.up  # the endpoint itself stays in for the model it serves
    # Checked again at every interval while a name is missing, logged once.
    for _ in range(3):
        await checker.check(endpoint)
    assert engine.model_reads() == 4
    health_log = [r for r in caplog.records if r.name == "routeyard.health"]
    warnings = [r for r in health_log if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        f"backend http://e0:8000: {reason}; it gets no requests for that model"]
    # The engine starts serving the name: back at the next check, logged at INFO.
    engine.models.append("lora-b")
    await checker.check(endpoint)
    assert sql.any_up() and view(sql)["state"] == "healthy"
    assert view(sql)["last_error"] is None and view(sql)["model_served"] is True
    health_log = [r for r in caplog.records if r.name == "routeyard.health"]
    infos = [r.getMessage() for r in health_log if r.levelno == logging.INFO]
    assert infos == ["backend http://e0:8000 serves model lora-b again"]


async def test_the_public_name_is_checked_when_there_is_no_backend_model() -> None:
    engine = Engine("other")
    checker, endpoint, clusters, _ = setup(engine, ("plain", None))
    await checker.check(endpoint)
    assert not clusters["plain"].any_up()
    assert view(clusters["plain"])["last_error"] == "model plain not served (engine serves: other)"


@pytest.mark.parametrize("status", [404, 401, 500])
async def test_an_engine_without_a_model_list_is_judged_by_health_alone(status: int) -> None:
    engine = Engine()
    engine.models_status = status
    checker, endpoint, clusters, _ = setup(engine, ("chat", "chat-model"))
    await checker.check(endpoint)
    assert clusters["chat"].any_up() and view(clusters["chat"])["model_served"] is None


async def test_models_are_read_on_the_first_check_then_every_nth_and_after_a_failure() -> None:
    engine = Engine("chat-model")
    checker, endpoint, _held, _ = setup(engine, ("chat", "chat-model"))  # clusters: weak refs
    await checker.check(endpoint)
    assert engine.model_reads() == 1
    for _ in range(MODELS_EVERY - 1):
        await checker.check(endpoint)
    assert engine.model_reads() == 1  # nothing amiss: /health alone
    await checker.check(endpoint)
    assert engine.model_reads() == 2  # the MODELS_EVERY-th passing check reads again
    engine.health = 503
    await checker.check(endpoint)
    assert engine.model_reads() == 2  # no use asking an engine that fails /health
    engine.health = 200
    await checker.check(endpoint)
    assert engine.model_reads() == 3  # it may have restarted with other models


async def test_a_reload_that_adds_a_model_reads_the_models_again() -> None:
    engine = Engine("chat-model")
    checker, endpoint, clusters, _ = setup(engine, ("chat", "chat-model"))
    await checker.check(endpoint)
    # A new snapshot's cluster with a name the engine was already known not to serve
    # starts without the endpoint, before any check.
    typo = Cluster(model_config("typo", backend_model="chat-modle"), [Member(endpoint, 1)],
                   NO_EJECTION)
    clusters["typo"] = typo
    await checker.check(endpoint)
    assert engine.model_reads() == 2 and not typo.any_up()
    later = Cluster(model_config("typo", backend_model="chat-modle"), [Member(endpoint, 1)],
                    NO_EJECTION)
    assert not later.any_up() and later.routable == ()


async def test_the_engine_key_goes_with_the_models_request() -> None:
    engine = Engine("chat-model")
    checker, endpoint, _held, _ = setup(engine, ("chat", "chat-model"))  # clusters: weak refs
    endpoint.api_key_header = "authorization: Bearer engine-secret\r\n"
    await checker.check(endpoint)
    (health, models) = engine.asked
    assert health.header("authorization") is None
    assert models.target == "/v1/models"
    assert models.header("authorization") == "Bearer engine-secret"
