"""One request in flight: body parsing as vLLM validates it, replies, and paced SSE."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import orjson
from sanic import HTTPResponse, Request
from sanic.response import raw

from router.fake_engine.formats import DONE, SSE_CONTENT_TYPE, anthropic_error, sse_data, sse_event
from router.fake_engine.state import EngineError, EngineState, Knobs, validation_error

JSON = "application/json"
StreamKind = Literal["data", "responses", "anthropic"]
_STREAM_ERROR = EngineError(500, "InternalServerError", "Internal server error")


def json_response(
    obj: Any, status: int = 200, headers: dict[str, str] | None = None
) -> HTTPResponse:
    return raw(orjson.dumps(obj), status=status, headers=headers, content_type=JSON)


@dataclass(slots=True)
class Call:
    request: Request
    state: EngineState
    knobs: Knobs
    entry: dict[str, Any]
    created: int = field(default_factory=lambda: int(time.time()))
    dropped: bool = False

    def body(self) -> dict[str, Any]:
        """The JSON object body, or raise vLLM's 400 (content type, syntax, not an object)."""
        content_type = self.request.headers.get("content-type", "").lower()
        if content_type.split(";", 1)[0].strip() != JSON:
            raise validation_error("Unsupported Media Type: Only 'application/json' is allowed")
        parsed = self.entry["json"]
        if parsed is None:
            data = self.request.body or b""
            if not data.strip():
                missing = {"type": "missing", "loc": ("body",), "msg": "Field required"}
                raise validation_error(str(missing), "body")
            try:
                parsed = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                detail: dict[str, Any] = {"type": "json_invalid", "loc": ("body", exc.pos),
                          "msg": "JSON decode error", "ctx": {"error": exc.msg}}
                raise validation_error(str(detail), f"body.{exc.pos}") from None
        if not isinstance(parsed, dict):
            wrong = {"type": "model_attributes_type", "loc": ("body",),
                      "msg": "Input should be a valid dictionary or object to extract fields from"}
            raise validation_error(str(wrong), "body")
        return parsed

    def request_id(self, prefix: str) -> str:
        """vLLM uses the incoming ``x-request-id`` as its request id when there is one."""
        return f"{prefix}-{self.entry['request_id'] or uuid.uuid4().hex}"

    async def generation_time(self, tokens: int) -> None:
        """A non-streamed answer takes as long as its stream would."""
        if self.knobs.token_delay_ms and tokens:
            await asyncio.sleep(self.knobs.token_delay_ms * tokens / 1000)

    async def reply(self, obj: Any, status: int = 200,
                    headers: dict[str, str] | None = None) -> HTTPResponse:
        if self.knobs.drop_after is not None:
            await self.drop()
        return json_response(obj, status, headers)

    async def drop(self) -> None:
        """Abort the connection as a crashing engine would, then wait to be cancelled."""
        self.dropped = True
        cast(asyncio.Transport, self.request.transport).abort()
        await asyncio.sleep(3600)

    def token_count(self, limit: int | None) -> int:
        return min(self.knobs.tokens, limit) if limit is not None else self.knobs.tokens


class Stream:
    """An SSE response written chunk by chunk, paced and faulted by the call's knobs."""

    def __init__(self, call: Call, kind: StreamKind = "data") -> None:
        self.call = call
        self.kind = kind
        self.response: HTTPResponse | None = None
        self.sequence = 0

    async def open(self) -> None:
        self.response = await self.call.request.respond(content_type=SSE_CONTENT_TYPE)

    async def send(self, data: bytes) -> None:
        assert self.response is not None
        await self.response.send(data)

    async def data(self, obj: Any) -> None:
        await self.send(sse_data(obj))

    async def event(self, type_: str, obj: dict[str, Any]) -> None:
        """An ``event: <type>`` frame; data starts with ``type`` (+ ``sequence_number``)."""
        if self.kind == "responses":
            obj = {"type": type_, "sequence_number": self.sequence, **obj}
            self.sequence += 1
        else:
            obj = {"type": type_, **obj}
        await self.send(sse_event(type_, obj))

    async def pace(self, index: int) -> bool:
        """Wait for token ``index``; False when an injected error ended the stream."""
        knobs = self.call.knobs
        if knobs.token_delay_ms:
            await asyncio.sleep(knobs.token_delay_ms / 1000)
        if knobs.drop_after is not None and index >= knobs.drop_after:
            await self.call.drop()
        if knobs.error_after is not None and index >= knobs.error_after:
            await self.error(_STREAM_ERROR)
            return False
        return True

    async def error(self, err: EngineError) -> None:
        """A mid-stream error, framed the way the route's stream frames it."""
        if self.kind == "data":
            await self.send(sse_data(err.envelope()) + DONE)
        elif self.kind == "responses":
            await self.event("error", {"code": err.type, "message": err.message, "param": None})
        else:
            await self.send(sse_event("error", anthropic_error(err.type, err.message)))
        await self.close()

    async def done(self) -> None:
        await self.send(DONE)
        await self.close()

    async def close(self) -> None:
        assert self.response is not None
        # What HTTPResponse.eof() does; eof itself has no annotations in Sanic.
        await self.response.send("", end_stream=True)
