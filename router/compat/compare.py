"""Normalise two answers to the same probe and list how they differ.

An answer is compared on what a client can observe: status, content type, and the body:
a JSON document, a sequence of Server-Sent Events, or raw bytes. Per-request values
(``IGNORED_FIELDS``) are dropped before comparing, and the model name is read as the same
whether the engine's served name or the router's public name was used. Floats are equal
within ``FLOAT_TOLERANCE`` (relative): an engine's float32 kernels may round the last bits
differently from one call to the next (vLLM's CPU build does for rerank scores), and a
router that relays bytes cannot cause a difference that small.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from router.catalog import StreamFormat
from router.compat.requests import Probe, stream_format

#: Object keys whose values differ per request, wherever they occur in a JSON body or
#: event: ids of completions, responses, output items, tool calls and messages, creation
#: and completion times, engine request ids and the backend fingerprint.
IGNORED_FIELDS: frozenset[str] = frozenset({
    "id",
    "created",
    "created_at",
    "completed_at",
    "request_id",
    "item_id",
    "response_id",
    "system_fingerprint",
})
IGNORED = "<ignored>"
MODEL = "<model>"
#: Relative difference under which two floats count as equal (float32 has ~7 digits).
FLOAT_TOLERANCE = 1e-5
#: Differences listed per probe before the rest is summarised as "... and N more".
MAX_DIFFERENCES = 6
_SNIPPET = 70


@dataclass(slots=True)
class Answer:
    """What one side answered: status, content type and body, or the transport error."""

    status: int = 0
    content_type: str = ""
    body: bytes = b""
    error: str | None = None
    events: list[Event] | None = None  # parsed when the body is an event stream

    def summary(self) -> str:
        if self.error:
            return "no answer"
        kind = media_type(self.content_type) or "no content type"
        kind = {"application/json": "json", "text/event-stream": "sse"}.get(kind, kind)
        if self.events is not None:
            kind += f" ({len(self.events)} events)"
        return f"{self.status} {kind}"


@dataclass(frozen=True, slots=True)
class Event:
    """One Server-Sent Event: its ``event:`` name (if any) and its joined ``data:``."""

    name: str | None
    data: str


@dataclass(slots=True)
class Outcome:
    """One probe's two answers and the differences between them (empty: same)."""

    probe: Probe
    engine: Answer
    router: Answer
    differences: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.differences


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def parse_sse(body: bytes) -> list[Event]:
    """The events of an SSE body; comments and empty events are skipped."""
    events = []
    text = body.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")
    for block in text.split("\n\n"):
        name: str | None = None
        data: list[str] = []
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            key, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if key == "event":
                name = value
            elif key == "data":
                data.append(value)
        if name is not None or data:
            events.append(Event(name, "\n".join(data)))
    return events


def normalise(value: Any, models: frozenset[str]) -> Any:
    """``value`` with ignored fields masked and the model names made one placeholder."""
    if isinstance(value, dict):
        return {k: IGNORED if k in IGNORED_FIELDS else normalise(v, models)
                for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v, models) for v in value]
    if isinstance(value, str):
        if value in models:
            return MODEL
        for name in models:  # a name quoted inside a message ("The model `x` does not exist")
            for quote in ("`", "'", '"'):
                value = value.replace(f"{quote}{name}{quote}", f"{quote}{MODEL}{quote}")
        return value
    return value


def diff(engine: Any, router: Any, where: str = "body") -> Iterator[str]:
    """Paths at which two normalised JSON values differ, depth first."""
    if isinstance(engine, dict) and isinstance(router, dict):
        for key in dict.fromkeys([*engine, *router]):
            here = f"{where}.{key}"
            if key not in router:
                yield f"{here}: missing through the router (engine: {_show(engine[key])})"
            elif key not in engine:
                yield f"{here}: added by the router ({_show(router[key])})"
            else:
                yield from diff(engine[key], router[key], here)
    elif isinstance(engine, list) and isinstance(router, list):
        if len(engine) != len(router):
            yield f"{where}: {len(engine)} items from the engine, {len(router)} through the router"
        for i, (a, b) in enumerate(zip(engine, router, strict=False)):
            yield from diff(a, b, f"{where}[{i}]")
    elif isinstance(engine, float) and isinstance(router, float):
        if not math.isclose(engine, router, rel_tol=FLOAT_TOLERANCE):
            yield f"{where}: engine {_show(engine)}, router {_show(router)}"
    elif type(engine) is not type(router) or engine != router:
        yield f"{where}: engine {_show(engine)}, router {_show(router)}"


def _show(value: Any) -> str:
    """A short JSON rendering; masked values are left out, they say nothing."""
    text = orjson.dumps(_unmasked(value)).decode()
    return text if len(text) <= _SNIPPET else text[: _SNIPPET - 1] + "…"


def _unmasked(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _unmasked(v) for k, v in value.items() if v not in (IGNORED, MODEL)}
    if isinstance(value, list):
        return [_unmasked(v) for v in value]
    return value


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


#: Numbers events in order: checked on each side, then masked, because merging deltas
#: (``coalesce``) renumbers them.
RENUMBERED = "sequence_number"


def _event_value(event: Event, models: frozenset[str]) -> Any:
    """An event as a comparable value: its name and its data (parsed JSON if it is JSON)."""
    data = _json(event.data.encode())
    if isinstance(data, dict):
        data.pop(RENUMBERED, None)
    return {"event": event.name,
            "data": event.data if data is None else normalise(data, models)}


def _numbered(events: list[Event]) -> bool:
    numbers = [d[RENUMBERED] for e in events
               if isinstance(d := _json(e.data.encode()), dict) and RENUMBERED in d]
    return numbers == list(range(len(numbers)))


def check_format(events: list[Event], expected: StreamFormat) -> list[str]:
    """How ``events`` break the catalog's framing for the route (empty: they keep it)."""
    problems = []
    if not events:
        return ["no events"]
    done = [i for i, e in enumerate(events) if e.data == "[DONE]"]
    if expected is StreamFormat.DATA_DONE:
        if done != [len(events) - 1]:
            problems.append("does not end with exactly one `data: [DONE]`")
        if any(e.name is not None for e in events):
            problems.append("has `event:` lines where the catalog says data-only")
    elif expected is StreamFormat.EVENT_DATA:
        if done:
            problems.append("has a `data: [DONE]` the catalog says this route never sends")
        if any(e.name is None for e in events):
            problems.append("has events without an `event:` line")
    return problems


def compare(probe: Probe, engine: Answer, router: Answer, models: frozenset[str]) -> Outcome:
    """Compare the engine's and the router's answer to ``probe``."""
    out = Outcome(probe, engine, router)
    if engine.error or router.error:
        for side, answer in (("engine", engine), ("router", router)):
            if answer.error:
                out.differences.append(f"{side}: {answer.error}")
        return out
    if engine.status != router.status:
        out.differences.append(f"status: engine {engine.status}, router {router.status}")
    if media_type(engine.content_type) != media_type(router.content_type) or (
        probe.expect == "same" and engine.content_type.lower() != router.content_type.lower()
    ):
        out.differences.append(
            f"content type: engine {engine.content_type!r}, router {router.content_type!r}")
    if media_type(engine.content_type) == "text/event-stream" and probe.streams:
        out.differences += _compare_events(probe, engine, router, models)
    elif probe.expect == "router-error":
        out.differences += _compare_error(engine, router, models)
    else:
        out.differences += _compare_bodies(engine, router, models)
    if len(out.differences) > MAX_DIFFERENCES:
        rest = len(out.differences) - MAX_DIFFERENCES + 1
        out.differences[MAX_DIFFERENCES - 1:] = [f"... and {rest} more"]
    return out


def _compare_bodies(engine: Answer, router: Answer, models: frozenset[str]) -> list[str]:
    a, b = _json(engine.body), _json(router.body)
    if a is None or b is None:
        if engine.body == router.body:
            return []
        return [f"body: {len(engine.body)} bytes from the engine, {len(router.body)} bytes "
                "through the router, not the same bytes"]
    return list(diff(normalise(a, models), normalise(b, models)))


def _compare_error(engine: Answer, router: Answer, models: frozenset[str]) -> list[str]:
    """An error routeyard answers itself: an envelope, and the engine's first sentence.

    ``type``, ``code`` and ``param`` are routeyard's own (vLLM 0.32 says ``param: null``
    for an unknown model on pooling routes and ``"model"`` on generate routes).
    """
    a, b = _json(engine.body), _json(router.body)
    problems = []
    for side, body in (("engine", a), ("router", b)):
        err = body.get("error") if isinstance(body, dict) else None
        if not isinstance(err, dict) or not {"message", "type", "param", "code"} <= set(err):
            problems.append(f"{side}: not an error envelope {{\"error\": {{message, type, "
                            f"param, code}}}}: {_show(body)}")
    if problems or not isinstance(a, dict) or not isinstance(b, dict):
        return problems
    problems += diff(normalise(first_sentence(a["error"]["message"]), models),
                     normalise(first_sentence(b["error"]["message"]), models),
                     "body.error.message (first sentence)")
    return problems


def first_sentence(message: object) -> object:
    """Up to the first ". ": the statement an engine may follow with details (vLLM 0.32
    lists its served names after "does not exist."; a router must not leak those)."""
    if not isinstance(message, str):
        return message
    head, sep, _ = message.partition(". ")
    return head + "." if sep else message


def _compare_events(probe: Probe, engine: Answer, router: Answer,
                    models: frozenset[str]) -> list[str]:
    """Framing per the catalog on each side, then the same events after ``coalesce``."""
    assert engine.events is not None and router.events is not None
    expected = stream_format(probe)
    problems = [f"{side} stream {p} ({expected.value})"
                for side, answer in (("engine", engine), ("router", router))
                for p in check_format(answer.events or [], expected)]
    a = coalesce([_event_value(e, models) for e in engine.events])
    b = coalesce([_event_value(e, models) for e in router.events])
    problems += [f"{side} stream: {RENUMBERED} is not 0, 1, 2, ..."
                 for side, answer in (("engine", engine), ("router", router))
                 if not _numbered(answer.events or [])]
    if len(a) != len(b):
        problems.append(f"events: {len(a)} from the engine, {len(b)} through the router "
                        "(after merging deltas)")
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            problems += [f"event {i + 1}: {d.removeprefix('body.')}" for d in diff(x, y, "body")]
            return problems  # after the first differing event the rest is usually shifted
    if len(a) != len(b):
        n = min(len(a), len(b))
        side, extra = ("engine", a[n]) if len(a) > len(b) else ("router", b[n])
        problems.append(f"event {n + 1} only from the {side}: {_show(extra)}")
    return problems


def coalesce(events: list[Any]) -> list[Any]:
    """Merge runs of delta events into one, so that chunk boundaries do not matter.

    vLLM hands a slow reader the tokens it has so far in one event, so how many events a
    stream has varies between two runs of the same request. Adjacent events with the same
    name and shape merge: ``DELTA_TEXT`` strings and ``DELTA_LISTS`` lists concatenate, a
    null takes the later value (e.g. ``finish_reason``), keys of either side are kept.
    Anything else (another event name, a usage chunk, ``[DONE]``) starts a new event.
    """
    out: list[Any] = []
    for event in events:
        merged = _merge(out[-1], event) if out else _NO
        if merged is _NO:
            out.append(event)
        else:
            out[-1] = merged
    return out


#: Keys whose strings are streamed piecewise (text, tool-call arguments, reasoning).
DELTA_TEXT = frozenset({"content", "text", "delta", "arguments", "reasoning",
                        "reasoning_content", "refusal", "partial_json"})
#: Keys whose lists are streamed piecewise.
DELTA_LISTS = frozenset({"logprobs", "token_ids"})
_NO: Any = object()


def _merge(a: Any, b: Any, key: str | None = None) -> Any:
    """``a`` then ``b`` as one delta event, or ``_NO`` when they are different events.

    Containers always recurse (two equal delta events still carry two deltas); only
    scalars that are equal merge as themselves.
    """
    if isinstance(a, str) and isinstance(b, str) and key in DELTA_TEXT:
        return a + b
    if isinstance(a, list) and isinstance(b, list):
        if key in DELTA_LISTS:
            return a + b
        if len(a) != len(b):
            return _NO
        items = [_merge(x, y, key) for x, y in zip(a, b, strict=True)]
        return _NO if any(i is _NO for i in items) else items
    if isinstance(a, dict) and isinstance(b, dict):
        merged = {}
        for k in dict.fromkeys([*a, *b]):
            value = b[k] if k not in a else a[k] if k not in b else _merge(a[k], b[k], k)
            if value is _NO:
                return _NO
            merged[k] = value
        return merged
    if a == b:
        return a
    return b if a is None else _NO
