"""Read the model name from a request body, and rewrite it for the backend.

JSON bodies are parsed once with orjson. The rewrite (for a model whose backends serve it
under another name) splices the new value into the original bytes at the top-level
``"model"`` member, so every other byte reaches the engine exactly as the client sent it.
The splice fails closed: when the member cannot be pinned down exactly (a duplicated key,
a non-string first value), the parsed object is re-serialized with ``model`` replaced, so
the engine never receives the client's public name.

Multipart bodies (the audio routes) are parsed with python-multipart, the parser behind
Starlette and so behind vLLM's own form handling. ``read_form`` records where the model
value's bytes lie, and ``rewrite_form_model`` replaces exactly those bytes, so uploaded
files are never touched. A form that names ``model`` twice is refused: the router would
authorize one value while the engine served another.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from router.errors import BadRequest

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

# JSON tokens the walk needs, one group each so the loop reads ``lastindex`` instead of
# copying text: 1 a string value, 2 a key (a string and its colon; group 1 is the key),
# 3 an opening bracket, 4 a closing one. Commas and scalars are skipped.
_STRING = rb'"[^"\\]*(?:\\.[^"\\]*)*"'
_TOKENS = re.compile(rb"(" + _STRING + rb")(?:[ \t\r\n]*(:))?|([{\[])|([}\]])", re.DOTALL)
_STRING_VALUE = re.compile(rb"[ \t\r\n]*(" + _STRING + rb")", re.DOTALL)
# Any raw key that could decode to "model" (letters may be written as \u escapes), then
# its colon. Where the opening quote is not escaped, a match is a "model" key at some depth.
_MODEL_KEY = re.compile(
    rb'"(?:m|\\u006[dD])(?:o|\\u006[fF])(?:d|\\u0064)(?:e|\\u0065)(?:l|\\u006[cC])"'
    rb"[ \t\r\n]*:"
)
_MAX_MODEL_KEY = len(b'"') * 2 + len(b"\\u006d") * 5  # every letter escaped
_KEY, _OPEN, _CLOSE = 2, 3, 4
_SMALL_BODY = 4096  # below it, two slices and a concatenation are the fastest splice

_FORM_DATA = b"multipart/form-data"
_CONTENT_DISPOSITION = b"content-disposition"
# ``name`` parameters of a Content-Disposition header, spelled in any way a parser might
# take for one (any case, RFC 2231 ``name*``): exactly one plain ``name=`` is accepted.
_NAME_PARAMS = re.compile(rb";[ \t]*name[ \t]*[*=]", re.IGNORECASE)


def model_from_json(body: bytes) -> tuple[str, dict[str, Any]]:
    """The ``model`` of a JSON object body, and the parsed body; ``BadRequest`` if unusable."""
    if not body:
        raise BadRequest("The request body is empty; send a JSON object with a `model`.")
    data = _parse_object(body)
    model = data.get("model")
    if type(model) is str and model:  # the common case, without a call
        return model, data
    return _check(model), data


def _parse_object(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _invalid_json(exc) from None
    if type(data) is not dict:
        raise BadRequest("The request body must be a JSON object.", code="invalid_body")
    return data


def _invalid_json(exc: orjson.JSONDecodeError) -> BadRequest:
    return BadRequest(f"The request body is not valid JSON: {exc}", code="invalid_json")


def _check(model: object) -> str:
    if model is None or model == "":
        raise BadRequest(
            "The request has no `model`; name one of the models in GET /v1/models.",
            param="model",
            code="missing_model",
        )
    if not isinstance(model, str):
        raise BadRequest("`model` must be a string.", param="model", code="invalid_model")
    return model


def rewrite_json_model(body: bytes, new_model: str) -> bytes:
    """The JSON object ``body`` with its top-level ``model`` set to ``new_model``.

    Call it on a body ``model_from_json`` accepted. Splices into the original bytes when
    exactly one top-level member decodes to the key ``model`` and holds a string;
    otherwise re-serializes the parsed object, so that every top-level ``model`` the
    engine could read is ``new_model``.
    """
    span = _json_model_span(body)
    if span is None:
        data = _parse_object(body)
        data["model"] = new_model
        return orjson.dumps(data)
    return _splice(body, span, orjson.dumps(new_model))


def _splice(body: bytes, span: tuple[int, int], value: bytes) -> bytes:
    """``body`` with the bytes of ``span`` replaced by ``value``."""
    start, end = span
    if len(body) < _SMALL_BODY:
        return body[:start] + value + body[end:]
    view = memoryview(body)  # one copy instead of two: large bodies are uploads
    return b"".join((view[:start], value, view[end:]))


def _json_model_span(body: bytes) -> tuple[int, int] | None:
    """The byte span of the string value of the one top-level ``model`` member, or None.

    None when there is no such member, more than one, or its value is not a string. The
    body must be a JSON object with a top-level ``model`` (``model_from_json`` proved it):
    so when the body holds only one ``model`` key at any depth, that one is it.
    """
    key_end = -1
    for key in _MODEL_KEY.finditer(body):
        if not _escaped(body, key.start()):
            if key_end >= 0:
                return _walk_to_model(body)  # nested "model" keys: find the top-level one
            key_end = key.end()
    if key_end < 0:
        return None
    value = _STRING_VALUE.match(body, key_end)
    return None if value is None else value.span(1)


def _escaped(body: bytes, quote: int) -> bool:
    """Whether the quote at ``quote`` is escaped (so inside a string, not opening one)."""
    start = quote
    while start > 0 and body[start - 1] == 0x5C:  # backslash
        start -= 1
    return (quote - start) % 2 == 1


def _walk_to_model(body: bytes) -> tuple[int, int] | None:
    """``_json_model_span`` by walking the tokens, to tell top-level keys from nested."""
    depth = 0
    found: tuple[int, int] | None = None
    for token in _TOKENS.finditer(body):
        kind = token.lastindex
        if kind == _OPEN:
            depth += 1
        elif kind == _CLOSE:
            depth -= 1
        elif kind == _KEY and depth == 1 and _is_model_key(token.group(1)):
            value = _STRING_VALUE.match(body, token.end())
            if value is None or found is not None:
                return None
            found = value.span(1)
            if _MODEL_KEY.search(body, found[1]) is None:
                return found  # no later key can be another "model": skip the rest
    return found


def _is_model_key(raw: bytes) -> bool:
    if raw == b'"model"':
        return True
    if b"\\" not in raw or len(raw) > _MAX_MODEL_KEY:
        return False
    try:
        return bool(orjson.loads(raw) == "model")
    except orjson.JSONDecodeError:
        return False


@dataclass(frozen=True, slots=True)
class Form:
    """A parsed ``multipart/form-data`` body: its model and its text fields.

    ``fields`` holds every non-file field (``model`` included), the last value of a
    repeated name winning as in Starlette. ``model_span`` is the (start, end) byte span of
    the model value in the body it was read from.
    """

    model: str
    fields: dict[str, str]
    model_span: tuple[int, int]


@dataclass(slots=True)
class _Part:
    disposition: bytes | None = None
    dispositions: int = 0
    start: int = -1
    end: int = -1


def read_form(body: bytes, content_type: str) -> Form:
    """Parse a ``multipart/form-data`` body the way Starlette (and so vLLM) reads it.

    Raises ``BadRequest``: ``invalid_multipart`` for a body or Content-Type that is not a
    complete multipart form; ``missing_model`` without a (non-empty) ``model`` field;
    ``duplicate_model`` when ``model`` is given more than once; ``invalid_model`` when the
    ``model`` part is a file.
    """
    try:
        ctype, params = parse_options_header(content_type)
    except UnicodeEncodeError:  # python-multipart reads header text as latin-1
        raise _invalid_multipart("The Content-Type header is not latin-1 text.") from None
    if ctype != _FORM_DATA:
        raise _invalid_multipart(
            f"The Content-Type must be multipart/form-data, not {content_type!r}."
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise _invalid_multipart("The multipart/form-data Content-Type has no boundary.")
    charset = params.get(b"charset")
    if charset is not None and not _is_utf8(charset):
        raise _invalid_multipart(
            f"The form's charset {charset.decode('latin-1')!r} is not supported; use UTF-8."
        )

    fields: dict[str, str] = {}
    model_span: tuple[int, int] | None = None
    header_name = bytearray()
    header_value = bytearray()
    part = _Part()
    ended = False

    def on_part_begin() -> None:
        nonlocal part
        part = _Part()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_name.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        if header_name.lower() == _CONTENT_DISPOSITION:
            part.disposition = bytes(header_value)
            part.dispositions += 1
        header_name.clear()
        header_value.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        # One write of the whole body: the parser hands out spans of ``body`` itself
        # (its look-behind buffer only serves data split across writes).
        if data is not body or (part.end >= 0 and start != part.end):
            raise _invalid_multipart("The form's part data could not be located.")
        if part.start < 0:
            part.start = start
        part.end = end

    def on_part_end() -> None:
        nonlocal model_span
        name, is_file = _disposition(part)
        if name == "model":
            if is_file:
                raise BadRequest(
                    "The form field `model` must be a text field, not a file.",
                    param="model",
                    code="invalid_model",
                )
            if model_span is not None:
                raise BadRequest(
                    "The form has more than one `model` field; send exactly one.",
                    param="model",
                    code="duplicate_model",
                )
            model_span = (part.start, part.end) if part.start >= 0 else (0, 0)
        if not is_file:
            fields[name] = _decode(body[part.start : part.end]) if part.start >= 0 else ""

    def on_end() -> None:
        nonlocal ended
        ended = True

    callbacks: MultipartCallbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
        "on_end": on_end,
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except FormParserError as exc:
        raise _invalid_multipart(f"The request body is not a valid multipart form: {exc}") from None
    if not ended:
        raise _invalid_multipart(
            "The multipart form is incomplete: its closing boundary is missing."
        )
    model = _check(fields.get("model"))
    assert model_span is not None  # a non-empty model value has a span
    return Form(model=model, fields=fields, model_span=model_span)


def _disposition(part: _Part) -> tuple[str, bool]:
    """The field name of a part, and whether it is a file; ``BadRequest`` if ambiguous."""
    if part.dispositions != 1 or part.disposition is None:
        raise _invalid_multipart("Each form part needs exactly one Content-Disposition header.")
    if len(_NAME_PARAMS.findall(part.disposition)) != 1:
        raise _invalid_multipart(
            "Each form part's Content-Disposition needs exactly one `name` parameter."
        )
    _, options = parse_options_header(part.disposition)
    name = options.get(b"name")
    if name is None:
        raise _invalid_multipart("A form part's Content-Disposition has no `name` parameter.")
    return _decode(name), b"filename" in options


def _decode(raw: bytes) -> str:
    # Starlette's _user_safe_decode for a UTF-8 form: latin-1 where the bytes are not UTF-8.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _is_utf8(charset: bytes) -> bool:
    try:
        return codecs.lookup(charset.decode("latin-1")).name == "utf-8"
    except LookupError:
        return False


def _invalid_multipart(message: str) -> BadRequest:
    return BadRequest(message, code="invalid_multipart")


def rewrite_form_model(body: bytes, form: Form, new_model: str) -> bytes:
    """``body`` (the one ``form`` was read from) with the model value set to ``new_model``.

    Only the bytes of the model value change; every other part, files included, is kept.
    """
    if "\r" in new_model or "\n" in new_model:
        raise ValueError(f"A form model name cannot contain a line break: {new_model!r}")
    return _splice(body, form.model_span, new_model.encode())
