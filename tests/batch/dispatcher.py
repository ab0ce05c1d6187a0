"""A real ``Dispatcher`` for tests: model name → fake engine, forwarded with httpx.

It plays the routing core's part: ``key_of`` reads the key id from ``Bearer key-<id>``
(the test server's tenant of that key is the same id); ``check`` enforces a per-model
endpoint allowlist and a per-key model allowlist; ``dispatch`` POSTs to the engine and
answers router-style errors (502 in OpenAI's envelope) when the engine cannot be reached;
``pressure`` is a value the test sets. It also counts what it sent, for assertions.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import httpx
import orjson


@dataclass(frozen=True)
class ModelRoute:
    url: str  # engine base URL
    endpoints: tuple[str, ...]
    engine_model: str | None = None  # name at the engine, if different


class EngineDispatcher:
    def __init__(self, models: dict[str, ModelRoute],
                 tenants: dict[str, list[str]] | None = None) -> None:
        self.models = models
        self.tenants = tenants or {}
        self.level = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self.sent: Counter[str] = Counter()  # custom marker (first message / input) → sends
        self.statuses: Counter[int] = Counter()
        self._client: httpx.AsyncClient | None = None
        self._headers = {"content-type": "application/json", "x-batch-worker": str(os.getpid())}

    def key_of(self, headers: Mapping[str, str]) -> str | None:
        key = headers.get("authorization", "").removeprefix("Bearer ").strip()
        return key[4:] if key.startswith("key-") else None

    def check(self, key: str | None, url: str, body: dict) -> str | None:
        model = body.get("model")
        route = self.models.get(model) if isinstance(model, str) else None
        if route is None:
            return f"The model `{model}` does not exist."
        if url not in route.endpoints:
            return (f"The endpoint {url} is not enabled for model `{model}`; enabled: "
                    f"{', '.join(route.endpoints)}.")
        allowed = self.tenants.get(key or "")
        if allowed is not None and model not in allowed:
            return f"The model `{model}` is not allowed for this API key."
        return None

    async def dispatch(self, url: str, body: bytes, key: str | None) -> tuple[int, bytes]:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=30, limits=httpx.Limits(
                max_connections=512, max_keepalive_connections=64))
        obj = orjson.loads(body)
        route = self.models[obj["model"]]
        if route.engine_model:
            obj["model"] = route.engine_model
            body = orjson.dumps(obj)
        self.sent[_marker(obj)] += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            response = await self._client.post(route.url + url, content=body,
                                                headers=self._headers)
        except httpx.HTTPError as exc:
            self.statuses[502] += 1
            return 502, orjson.dumps({"error": {"message": f"engine unreachable: {exc}",
                                                "type": "server_error", "param": None,
                                                "code": "backend_unavailable"}})
        finally:
            self.in_flight -= 1
        self.statuses[response.status_code] += 1
        return response.status_code, response.content

    def pressure(self) -> float:
        return self.level

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _marker(body: dict) -> str:
    """What identifies a test request: the prompt, the first message, or the input."""
    if "messages" in body:
        return str(body["messages"][0].get("content"))
    return str(body.get("prompt", body.get("input")))


def build(engines: dict[str, str], tenants: dict[str, list[str]] | None = None
          ) -> EngineDispatcher:
    """The test models: chat-, slow-, flaky-, private-, chat-only-model (generate), embed-model."""
    chat = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
    return EngineDispatcher({
        "chat-model": ModelRoute(engines["generate"], chat),
        "slow-model": ModelRoute(engines["slow"], chat, "chat-model"),
        "flaky-model": ModelRoute(engines["flaky"], chat, "chat-model"),
        "embed-model": ModelRoute(engines["embed"], ("/v1/embeddings",)),
        "private-model": ModelRoute(engines["generate"], chat, "chat-model"),
        "chat-only-model": ModelRoute(engines["generate"], ("/v1/chat/completions",),
                                      "chat-model"),
    }, tenants)
