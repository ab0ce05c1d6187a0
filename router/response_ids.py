"""Which backend holds each stored Responses API answer.

vLLM keeps ``store``d responses (``VLLM_ENABLE_RESPONSES_API_STORE=1``) in the memory of
the engine that made them: a follow-up with ``previous_response_id``, a
``GET /v1/responses/{id}`` or a ``/cancel`` must reach that engine, or it answers 404.
The router reads the id of every answer to ``POST /v1/responses`` (``"id": "resp_…"``, in
the body or the stream's first event) and remembers (model, backend) for it here.

The map is per worker process and bounded (least recently used ids go first). What it
does not know (an id made through another worker or replica, or forgotten) is found by
asking the model's backends in turn: vLLM answers 404 for an id it does not hold, before
any generation, so asking another backend is safe (``relay.exchange``'s ``probe``).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from router.cluster import Endpoint
from router.relay import Pin
from router.snapshot import ModelEntry

#: The route whose answers are remembered (and whose ``previous_response_id`` is placed).
RESPONSES_CREATE = "/v1/responses"
#: The first response id in a body or stream chunk (vLLM: ``resp_<uuid hex>``).
_RESPONSE_ID = re.compile(rb'"id"\s*:\s*"(resp_[A-Za-z0-9_\-]{1,200})"')
#: How far into an answer the id is looked for; it comes first in vLLM's answers.
SCAN_BYTES = 8192
#: Stream chunks read for the id before giving up (vLLM's first event carries it).
SCAN_CHUNKS = 4


def response_id_in(data: bytes) -> str | None:
    """The first ``resp_…`` id in ``data`` (the start of an answer), if any."""
    found = _RESPONSE_ID.search(data, 0, SCAN_BYTES)
    return found.group(1).decode("ascii") if found is not None else None


class ResponseIds:
    """Response id → (model, backend key), least recently used first out."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._where: OrderedDict[str, tuple[str, str]] = OrderedDict()

    def remember(self, response_id: str, model: str, backend: str) -> None:
        where = self._where
        where[response_id] = (model, backend)
        where.move_to_end(response_id)
        if len(where) > self.capacity:
            where.popitem(last=False)

    def lookup(self, response_id: str) -> tuple[str, str] | None:
        found = self._where.get(response_id)
        if found is not None:
            self._where.move_to_end(response_id)
        return found

    def __len__(self) -> int:
        return len(self._where)

    def pin(self, model: str, body: dict[str, Any]) -> Pin:
        """How to send a ``POST /v1/responses`` (parsed ``body``) for ``model``: learn the
        id of its answer unless ``store`` is false, and with a ``previous_response_id`` go
        first to the backend that holds that one, probing the others when it is unknown
        or gone (and remember where it was found)."""
        capture = None
        if body.get("store") is not False:
            chunks = 0

            def capture(endpoint: Endpoint, data: bytes) -> bool:
                nonlocal chunks
                chunks += 1
                response_id = response_id_in(data)
                if response_id is not None:
                    self.remember(response_id, model, endpoint.key)
                return response_id is not None or chunks >= SCAN_CHUNKS

        previous = body.get("previous_response_id")
        if not isinstance(previous, str):
            return Pin(capture=capture)
        where = self.lookup(previous)
        backend = where[1] if where is not None and where[0] == model else None

        def found(endpoint: Endpoint) -> None:
            self.remember(previous, model, endpoint.key)

        return Pin(backend, probe=True, found=found, capture=capture)

    def found(self, response_id: str) -> Callable[[ModelEntry, Endpoint], None]:
        """For ``forward_stored``: remember where ``response_id`` was found."""
        return lambda model, endpoint: self.remember(response_id, model.name, endpoint.key)

    def holders(self, response_id: str, models: list[ModelEntry]
                ) -> list[tuple[ModelEntry, str | None]]:
        """(model, backend) to ask for a stored answer: the one remembered first, then
        every other model of ``models`` (those enabling ``responses`` for this client)."""
        found = self.lookup(response_id)
        if found is None:
            return [(m, None) for m in models]
        first = [(m, found[1]) for m in models if m.name == found[0]]
        return first + [(m, None) for m in models if m.name != found[0]]
