"""The one interface between batch execution and the routing core.

The server passes its routing core (the same allowlists, load balancing and retries as
online traffic); tests pass one that forwards to fake engines over HTTP.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Dispatcher(Protocol):
    def check(self, tenant: str | None, url: str, body: dict[str, Any]) -> str | None:
        """Whether one input line may run, before anything is sent.

        None if it may; otherwise the message to show the user: unknown model, endpoint
        not enabled for the model, model not allowed for the tenant. Must not block.
        """
        ...

    async def dispatch(self, url: str, body: bytes, tenant: str | None) -> tuple[int, bytes]:
        """Send one request (``url`` such as ``/v1/chat/completions``, JSON ``body``) for
        ``tenant`` (None when auth is off), admitted as online requests are.

        Returns the status and JSON body: the engine's, or the router's own error in
        OpenAI's envelope with its status (503 no healthy endpoint, 504 timeout...).
        Never streams. Raises only ``asyncio.CancelledError``.
        """
        ...

    def pressure(self) -> float:
        """0.0 when online traffic is idle, 1.0 when it saturates the backends."""
        ...
