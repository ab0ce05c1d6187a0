"""The one interface between batch execution and the routing core.

The server passes its routing core (the same allowlists, load balancing, retries and
per-key rate limits as online traffic); tests pass one that forwards to fake engines
over HTTP.

A batch runs as the API key that created it: ``key_of`` names that key when the batch is
created, the id is stored with the batch, and every later ``check`` and ``dispatch`` of
its lines gets it back. The batch package never interprets it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Dispatcher(Protocol):
    def key_of(self, headers: Mapping[str, str]) -> str | None:
        """The id of the API key that the request with these ``headers`` presents (None
        when the routing core has no authentication). Called when a batch is created,
        after the API authenticated the caller; may raise the router's 401 error."""
        ...

    def check(self, key: str | None, url: str, body: dict[str, Any]) -> str | None:
        """Whether one input line of a batch created by ``key`` may run, before anything
        is sent.

        None if it may; otherwise the message to show the user: unknown model, endpoint
        not enabled for the model, model not allowed for the key, key no longer valid.
        Must not block.
        """
        ...

    async def dispatch(self, url: str, body: bytes, key: str | None) -> tuple[int, bytes]:
        """Send one request (``url`` such as ``/v1/chat/completions``, JSON ``body``) as
        ``key`` (None when auth is off), admitted as online requests of that key are:
        its models, and its rate limits (a line over them answers 429).

        Returns the status and JSON body: the engine's, or the router's own error in
        OpenAI's envelope with its status (404 model not allowed, 429 rate limited, 503
        no healthy endpoint, 504 timeout...). Never streams. Raises only
        ``asyncio.CancelledError``.
        """
        ...

    def pressure(self) -> float:
        """0.0 when online traffic is idle, 1.0 when it saturates the backends."""
        ...
