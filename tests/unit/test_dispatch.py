"""Batch lines through the request path, in process: admitted on the current snapshot."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from router.batch.config import BatchConfig
from router.batch.service import RESTART_SETTINGS, BatchService
from router.dispatch import RouterDispatcher
from router.endpoint import EndpointRegistry
from router.proxy import Proxy
from router.reload import ConfigHolder
from router.stored_responses import ResponseIds
from router.tenants.limits import LocalLimiter
from router.upstream_mock import MockReply, MockRequest, MockTransport

ROUTES = """models:
  chat-a:
    backends:
      - url: http://engine-a:8000
    endpoints: [{groups}]
    backend_model: engine-chat
"""
LINE = orjson.dumps({"model": "chat-a", "messages": [{"role": "user", "content": "hi"}]})


def _engine(request: MockRequest) -> MockReply:
    body = orjson.dumps({"object": "chat.completion", "model": orjson.loads(request.body)["model"],
                         "usage": {"prompt_tokens": 3, "completion_tokens": 2}})
    return MockReply(200, [(b"content-type", b"application/json")], [body])


@pytest.fixture
async def dispatcher(tmp_path: Path) -> RouterDispatcher:
    path = tmp_path / "routes.yaml"
    path.write_text(ROUTES.format(groups="chat, completions"))
    transports: list[MockTransport] = []

    def transport(origin: object) -> MockTransport:
        transports.append(MockTransport(_engine))
        return transports[-1]

    holder = ConfigHolder(path, EndpointRegistry(transports=transport))
    await holder.load()
    proxy = Proxy(holder, ResponseIds())
    proxy.start(LocalLimiter(), [], None)
    return RouterDispatcher(proxy)


async def test_a_line_reaches_the_engine_with_the_backend_name(dispatcher: RouterDispatcher
                                                               ) -> None:
    status, body = await dispatcher.dispatch("/v1/chat/completions", LINE, None)
    assert status == 200
    assert orjson.loads(body)["model"] == "engine-chat"


async def test_a_reload_that_disables_the_group_fails_the_next_lines(
        dispatcher: RouterDispatcher) -> None:
    holder = dispatcher.proxy.holder
    assert (await dispatcher.dispatch("/v1/chat/completions", LINE, None))[0] == 200
    holder.path.write_text(ROUTES.format(groups="completions"))
    assert await holder.reload()
    status, body = await dispatcher.dispatch("/v1/chat/completions", LINE, None)
    assert status == 403
    assert orjson.loads(body)["error"]["code"] == "endpoint_not_enabled"


async def test_unknown_url_and_model(dispatcher: RouterDispatcher) -> None:
    status, body = await dispatcher.dispatch(
        "/v1/chat/completions", orjson.dumps({"model": "nope", "messages": []}), None)
    assert (status, orjson.loads(body)["error"]["code"]) == (404, "model_not_found")


def test_reconfigure_applies_live_settings_and_names_the_fixed_ones() -> None:
    service = BatchService(BatchConfig(max_attempts=4, database_url="sqlite+aiosqlite:///a.db"))
    fixed = service.reconfigure(BatchConfig(max_attempts=2,
                                            database_url="sqlite+aiosqlite:///b.db"))
    assert fixed == ["database_url"]
    assert service.config.max_attempts == 2
    assert service.config.database_url == "sqlite+aiosqlite:///a.db"  # until a restart
    assert set(RESTART_SETTINGS) <= set(BatchConfig.model_fields)
    assert service.reconfigure(None) == list(RESTART_SETTINGS)
    assert service.config.max_attempts == 2
