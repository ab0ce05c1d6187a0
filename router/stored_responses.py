"""Which backend holds each stored Responses API answer.

vLLM keeps ``store``d responses (``VLLM_ENABLE_RESPONSES_API_STORE=1``) in the memory of
the engine that made them: a follow-up with ``previous_response_id``, a
``GET /v1/responses/{id}`` or a ``/cancel`` must reach that engine, or it answers 404.
The router reads the id of every answer to ``POST /v1/responses`` (``"id": "resp_…"``, in
the body or the stream's first event) and remembers (model, backend) for it here.

The map is per worker process and bounded (least recently used ids go first). What it
does not know (an id made through another worker or replica, or forgotten) is found by
asking the model's backends in turn: vLLM answers 404 for an id it does not hold, before
any generation, so asking another backend is safe. The relay knows none of this: it
takes a ``Placement`` (``ResponsePlacement`` here) that names the endpoint to try first,
passes on 404s, and learns ids from the answers it accepts.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from router.errors import QueueTimeout, ResponseNotFound, UpstreamError
from router.relay import Capture, Deliver, NotHere, forward

if TYPE_CHECKING:
    from router.endpoint import Endpoint
    from router.record import AttemptTrace, Outcome
    from router.relay import Outbound
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

    def placement(self, model: str, body: dict[str, Any]) -> ResponsePlacement:
        """How to place a ``POST /v1/responses`` (parsed ``body``) for ``model``: learn the
        id of its answer unless ``store`` is false, and with a ``previous_response_id`` go
        first to the backend that holds that one, probing the others when it is unknown
        or gone (and remember where it was found)."""
        learn = body.get("store") is not False
        previous = body.get("previous_response_id")
        if not isinstance(previous, str):
            return ResponsePlacement(self, model, learn=learn)
        where = self.lookup(previous)
        backend = where[1] if where is not None and where[0] == model else None
        return ResponsePlacement(self, model, prefer=backend, asked_about=previous,
                                 learn=learn)

    def holders(self, response_id: str, models: list[ModelEntry]
                ) -> list[tuple[ModelEntry, str | None]]:
        """(model, backend) to ask for a stored answer: the one remembered first, then
        every other model of ``models`` (those enabling ``responses`` for this client)."""
        found = self.lookup(response_id)
        if found is None:
            return [(m, None) for m in models]
        first = [(m, found[1]) for m in models if m.name == found[0]]
        return first + [(m, None) for m in models if m.name != found[0]]


@dataclass(slots=True)
class ResponsePlacement:
    """The relay's ``Placement`` for requests about stored answers.

    ``asked_about``: the id the request is about (a follow-up's previous id, or the id of
    a GET/cancel): its 404s pass to the next backend, and the backend that answers is
    remembered as its holder. ``learn``: remember the id of a new answer (2xx).
    ``lookup``: a GET/cancel, whose holder is any backend that does not answer 404 (or
    5xx). ``last``: no other model is left to ask, so a final 404 is the answer."""

    ids: ResponseIds
    model: str
    prefer: str | None = None
    asked_about: str | None = None
    learn: bool = False
    lookup: bool = False
    last: bool = True

    def passes(self, status: int, more: bool) -> bool:
        return status == 404 and self.asked_about is not None and (more or not self.last)

    def answered(self, endpoint: Endpoint, status: int) -> Capture | None:
        ok = 200 <= status < 300
        if self.asked_about is not None and (
                ok or (self.lookup and status < 500 and status != 404)):
            self.ids.remember(self.asked_about, self.model, endpoint.key)
        if not (self.learn and ok):
            return None
        ids, model, key = self.ids, self.model, endpoint.key
        chunks = 0

        def capture(data: bytes) -> bool:
            nonlocal chunks
            chunks += 1
            response_id = response_id_in(data)
            if response_id is not None:
                ids.remember(response_id, model, key)
            return response_id is not None or chunks >= SCAN_CHUNKS

        return capture


async def forward_stored(response_id: str, holders: list[tuple[ModelEntry, str | None]],
                         ids: ResponseIds, outbound: Outbound, outcome: Outcome,
                         deliver: Deliver[None], matched: Callable[[ModelEntry], None],
                         trace: AttemptTrace | None = None) -> None:
    """A request about a stored answer (``GET``/``cancel`` by id), which names no model:
    ask the backends of each (model, backend known to hold it) in turn, each backend
    once, and deliver the first answer that is not a 404 (and remember where it was), or
    the last 404. A model whose backends cannot answer now (none up, queue full,
    connection failures) is passed over while another model is left."""
    asked: set[Endpoint] = set()
    for n, (model, backend) in enumerate(holders, 1):
        last = n == len(holders)
        if asked.issuperset(model.cluster.endpoints):
            if last:
                raise ResponseNotFound(response_id)
            continue  # its backends (shared with a model asked before) said 404 already
        matched(model)
        placement = ResponsePlacement(ids, model.name, prefer=backend,
                                      asked_about=response_id, lookup=True, last=last)
        try:
            await forward(model, outbound, outcome, deliver, trace=trace,
                          placement=placement, tried=asked)
            return
        except NotHere:
            continue
        except (UpstreamError, QueueTimeout):
            if not last:
                continue
            raise
    raise ResponseNotFound(response_id)
