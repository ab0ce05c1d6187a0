"""Model names are read once and rewritten for the backend, never reaching it unchanged."""

from __future__ import annotations

import io
import json
import random
from typing import Any

import httpx
import orjson
import pytest
from python_multipart import parse_form
from python_multipart.multipart import Field, File

from router.errors import BadRequest
from router.model_field import (
    Form,
    model_from_json,
    read_form,
    rewrite_form_model,
    rewrite_json_model,
)

NEW = "backend/é"


def _top_level_models(body: bytes) -> list[object]:
    """Every top-level ``model`` value in order, duplicates included (stdlib keeps them)."""
    pairs = json.loads(body, object_pairs_hook=lambda p: p)
    return [value for key, value in pairs if key == "model"]


def _assert_rewritten(body: bytes, out: bytes, new: str = NEW) -> None:
    """The engine can only read ``new`` as the model, and nothing else changed."""
    assert orjson.loads(out)["model"] == new
    assert _top_level_models(out) == [new]
    parsed, original = orjson.loads(out), orjson.loads(body)
    parsed.pop("model")
    original.pop("model")
    assert parsed == original


# --- JSON: the splice -----------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"a","messages":[]}',
        b'{ "messages": [{"model": "a"}], "model" : "a" }',
        b'{"x": "\\"model\\": \\"a\\"", "model":"a"}',
        b'{"tools": {"model": {"model": "a"}}, "n": [1, {"model": "a"}], "model": "a", "z": 1}',
        b'{"a":"model","model":"a"}',
        b'{"model":"a","messages":[{"role":"user","content":"{\\"model\\":\\"a\\"}"}]}',
        b'{"model":"a","tools":[{"parameters":{"properties":{"model":{"type":"string"}}}}]}',
        b'{"model":"a","response_format":{"model":"a","schema":{"model":"a"}}}',
        b'{"x\\"model": 1, "model":"a"}',  # a key ending in an escaped quote and model
        b'{"x":"\\"model\\" :", "model":"a"}',
    ],
)
def test_rewrite_touches_only_the_top_level_model(body: bytes) -> None:
    assert model_from_json(body)[0] == "a"
    out = rewrite_json_model(body, NEW)
    _assert_rewritten(body, out)
    assert len(out) - len(body) == len(orjson.dumps(NEW)) - len(b'"a"')  # a splice


@pytest.mark.parametrize(
    "body",
    [
        b'{\n  "model" :\t"a"\r\n}',
        b'{ "model"\n:\n"a" , "n" : 1 }',
        b'\n\t { "stream" : true ,\r\n "model":  "a"\n}\n ',
        b'{"model"\r\n\t :\r\n\t "a"}',
    ],
)
def test_whitespace_around_the_member_is_kept(body: bytes) -> None:
    out = rewrite_json_model(body, "b")
    assert out == body.replace(b'"a"', b'"b"')


def test_nested_model_keys_are_byte_identical() -> None:
    nested = b'[{"role":"user","model":"a","content":{"model" : "a"}}]'
    body = b'{"messages":' + nested + b',"model":"a","tools":' + nested + b"}"
    out = rewrite_json_model(body, "b")
    assert out == b'{"messages":' + nested + b',"model":"b","tools":' + nested + b"}"


def test_a_large_body_is_spliced() -> None:
    content = orjson.dumps("long \"text\"\n" * 2000)
    body = b'{"messages":[{"role":"user","content":' + content + b'}],\n"model": "a"}'
    assert rewrite_json_model(body, "b") == body[:-4] + b'"b"}'


@pytest.mark.parametrize(
    "body",
    [
        b'{"mod\\u0065l":"a","x":1}',
        b'{"\\u006d\\u006F\\u0064\\u0065\\u006C":"a","x":[1,2]}',
        b'{"x":{"model":"a"},"m\\u006fdel" : "a"}',
    ],
)
def test_escaped_key_is_found(body: bytes) -> None:
    assert model_from_json(body)[0] == "a"
    out = rewrite_json_model(body, NEW)
    _assert_rewritten(body, out)
    assert b'"a"' not in out.replace(b'{"model":"a"}', b"")


def test_an_escaped_other_key_is_not_taken_for_model() -> None:
    body = b'{"mode\\u006c2":"a","model":"a","\\u006d":"a"}'
    out = rewrite_json_model(body, "b")
    assert out == b'{"mode\\u006c2":"a","model":"b","\\u006d":"a"}'


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"a","model":"a"}',
        b'{"model":"cheap","messages":[],"model":"premium"}',
        b'{"model":"cheap","mod\\u0065l":"premium"}',
        b'{"mod\\u0065l":"cheap","model":"premium"}',
        b'{"model":1,"model":"a"}',
        b'{"model":{"x":"y"},"n":2,"model":"a"}',
        b'{"model":"a","x":{"model":"q"},"model":"b","model":"c"}',
    ],
)
def test_duplicate_keys_are_all_replaced(body: bytes) -> None:
    model_from_json(body)  # the last one, as orjson reads it
    out = rewrite_json_model(body, NEW)
    assert _top_level_models(out) == [NEW]
    assert orjson.loads(out)["model"] == NEW
    assert b"cheap" not in out and b"premium" not in out


@pytest.mark.parametrize(
    ("old", "new"),
    [("é模型", "模型/β"), ("a", "🦙-3"), ("\u2028", "x\"y\\z"), ("ascii", "ünïcödé")],
)
def test_unicode_values(old: str, new: str) -> None:
    for raw in (orjson.dumps(old), json.dumps(old).encode()):  # raw UTF-8 and \u escapes
        body = b'{"messages":[{"content":"' + old.encode() + b'"}],"model":' + raw + b"}"
        assert model_from_json(body)[0] == old
        out = rewrite_json_model(body, new)
        _assert_rewritten(body, out, new)
        assert out.startswith(b'{"messages":[{"content":"' + old.encode() + b'"}],"model":')


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b"{}", b'{"model": null}', b'{"model": 1}'])
def test_bad_bodies(body: bytes) -> None:
    with pytest.raises(BadRequest):
        model_from_json(body)


# --- JSON: many random bodies ---------------------------------------------------------

_CHARS = ['a', 'b', 'model', '"', '\\', '/', ':', '{', '}', '[', ']', ',', ' ', '\n', 'é',
          '模', '🦙', '\u2028', '\x00']


def _text(rng: random.Random) -> str:
    return "".join(rng.choice(_CHARS) for _ in range(rng.randrange(6)))


def _ws(rng: random.Random) -> str:
    return "".join(rng.choice(" \t\r\n") for _ in range(rng.choice((0, 0, 0, 1, 3))))


def _string(text: str, rng: random.Random) -> str:
    if rng.random() < 0.2:  # escape every ASCII letter, as a hostile client might
        return '"' + "".join(
            f"\\u{ord(c):04x}" if c.isascii() and c.isalpha() else json.dumps(c)[1:-1]
            for c in text
        ) + '"'
    return json.dumps(text, ensure_ascii=rng.random() < 0.5)


def _value(rng: random.Random, depth: int) -> tuple[Any, str]:
    """A random JSON value and one random way to write it."""
    pick = rng.randrange(8 if depth < 3 else 5)
    if pick == 0:
        number = rng.choice([0, -1, 7, 2.5, 1e10, 12345678901234])
        return number, json.dumps(number)
    if pick == 1:
        literal = rng.choice([True, False, None])
        return literal, json.dumps(literal)
    if pick in (2, 3, 4):
        text = _text(rng)
        return text, _string(text, rng)
    if pick == 5:
        items = [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
        raw = "[" + ",".join(_ws(rng) + r + _ws(rng) for _, r in items) + "]"
        return [v for v, _ in items], raw
    return _object(rng, depth + 1, nested_model=rng.random() < 0.5)


def _object(rng: random.Random, depth: int, nested_model: bool) -> tuple[dict[str, Any], str]:
    keys = list(dict.fromkeys(rng.choice(["a", "model2", "mode", "x", _text(rng)])
                              for _ in range(rng.randrange(5))))
    if nested_model:
        keys.insert(rng.randrange(len(keys) + 1), "model")
    members = [(k, *_value(rng, depth)) for k in keys if k != "model" or nested_model]
    raw = "{" + ",".join(f"{_ws(rng)}{_string(k, rng)}{_ws(rng)}:{_ws(rng)}{r}{_ws(rng)}"
                         for k, _, r in members) + "}"
    return {k: v for k, v, _ in members}, raw


def _random_body(rng: random.Random) -> tuple[bytes, bytes | None]:
    """A chat-like body with one top-level string ``model`` and the splice expected of it,
    or (expected None) a body with duplicate top-level ``model`` keys."""
    _, raw = _object(rng, 1, nested_model=False)
    members = [raw[1:-1]] if raw != "{}" else []
    at = rng.randrange(len(members) + 1)
    key = _ws(rng) + _string("model", rng) + _ws(rng) + ":" + _ws(rng)
    value = _string(rng.choice(["a", "public/é", "model"]), rng)
    parts = [*members[:at], key + "\0" + _ws(rng), *members[at:]]
    if rng.random() < 0.15:
        other = _value(rng, 2)[1] if rng.random() < 0.5 else _string("other", rng)
        parts.insert(rng.randrange(len(parts) + 1), f"{_string('model', rng)}:{other}")
        return ("{" + ",".join(parts) + "}").replace("\0", value, 1).encode(), None
    before, after = ("{" + ",".join(parts) + "}").split("\0")
    body = (before + value + after).encode()
    return body, before.encode() + orjson.dumps(NEW) + after.encode()


def test_random_bodies_always_carry_the_new_model() -> None:
    rng = random.Random(20240611)
    duplicates = 0
    for _ in range(3000):
        body, expected = _random_body(rng)
        try:
            model_from_json(body)
        except BadRequest:
            assert expected is None  # a later non-string duplicate is what orjson reads
        out = rewrite_json_model(body, NEW)
        _assert_rewritten(body, out)
        if expected is None:
            duplicates += 1
        else:
            assert out == expected  # the splice: every other byte as the client wrote it
    assert 200 < duplicates < 1000


# --- multipart ------------------------------------------------------------------------

BOUNDARY = "----routeyard7MA4YWxk"
CTYPE = f"multipart/form-data; boundary={BOUNDARY}"
# Audio whose bytes hold what looks like a model part, and pieces of the delimiter.
AUDIO = (b"RIFF\x00\x01WAVE\r\n--" + BOUNDARY.encode()[:-1] + b"\r\n"
         b'Content-Disposition: form-data; name="model"\r\n\r\npublic\r\n--\r\n'
         b'Content-Disposition: form-data; name=model\r\n\r\npublic\r\n\x00\xff' * 3)


def _part(disposition: bytes, value: bytes, *headers: bytes) -> bytes:
    lines = [b"--" + BOUNDARY.encode(), b"Content-Disposition: " + disposition, *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + value + b"\r\n"


def _form(*parts: bytes, epilogue: bytes = b"\r\n") -> bytes:
    return b"".join(parts) + b"--" + BOUNDARY.encode() + b"--" + epilogue


def _audio_part() -> bytes:
    return _part(b'form-data; name="file"; filename="a.wav"', AUDIO,
                 b"Content-Type: audio/wav")


def _parse(body: bytes) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """Fields and file contents as python-multipart's own form parser reads them, fed in
    small chunks as a server reading the socket would."""
    fields: dict[str, bytes] = {}
    files: dict[str, bytes] = {}

    def on_field(field: Field) -> None:
        assert field.field_name is not None
        fields[field.field_name.decode()] = field.value or b""

    def on_file(file: File) -> None:
        assert file.field_name is not None
        file.file_object.seek(0)
        files[file.field_name.decode()] = file.file_object.read()

    headers = {"Content-Type": CTYPE.encode()}
    parse_form(headers, io.BytesIO(body), on_field, on_file, chunk_size=7)
    return fields, files


def _code(body: bytes, content_type: str = CTYPE) -> str | None:
    with pytest.raises(BadRequest) as caught:
        read_form(body, content_type)
    assert caught.value.status == 400
    return caught.value.code


@pytest.mark.parametrize(
    "disposition",
    [
        b'form-data; name="model"',
        b"form-data; name=model",
        b'form-data; name="model"; charset="x"; foo=bar',
        b'form-data;name="model"',
        b'form-data ;  name = "model" ',
        b'FORM-DATA; name="model"',
        b"form-data; NAME=model",  # parameter names are case-insensitive
    ],
)
def test_model_field_spellings(disposition: bytes) -> None:
    body = _form(_audio_part(), _part(disposition, b"public"),
                 _part(b'form-data; name="language"', b"en"))
    form = read_form(body, CTYPE)
    assert form.model == "public"
    assert form.fields == {"model": "public", "language": "en"}
    assert body[form.model_span[0] : form.model_span[1]] == b"public"
    out = rewrite_form_model(body, form, "private")
    assert out == body.replace(b"\r\n\r\npublic\r\n--" + BOUNDARY.encode() + b"\r\n",
                               b"\r\n\r\nprivate\r\n--" + BOUNDARY.encode() + b"\r\n")
    fields, files = _parse(out)
    assert fields["model"] == b"private"
    assert files["file"] == AUDIO


@pytest.mark.parametrize(
    "headers",
    [
        (b"content-disposition: form-data; name=model",),
        (b'Content-Disposition:form-data; name="model"',),
        (b'Content-Disposition: form-data; name="model"', b"Content-Type: text/plain"),
        (b"Content-Type: text/plain; charset=utf-8",
         b'Content-Disposition: form-data; name="model"'),
    ],
)
def test_model_part_headers(headers: tuple[bytes, ...]) -> None:
    part = b"--" + BOUNDARY.encode() + b"\r\n" + b"\r\n".join(headers) + b"\r\n\r\npublic\r\n"
    body = _form(part, _audio_part())
    form = read_form(body, CTYPE)
    assert form.model == "public"
    fields, files = _parse(rewrite_form_model(body, form, "private"))
    assert (fields["model"], files["file"]) == (b"private", AUDIO)


@pytest.mark.parametrize(
    ("prefix", "epilogue", "padding"),
    [
        (b"", b"\r\n", b""),
        (b"", b"", b""),  # no CRLF after the closing delimiter
        (b"\r\n\r\n", b"\r\n", b""),  # CRLFs before the first delimiter
        (b"", b"\r\nepilogue text\r\n", b""),  # an epilogue after the close
        (b"", b"\r\n", b" \t "),  # transport padding after a delimiter
    ],
)
def test_framing_variants_python_multipart_accepts(
    prefix: bytes, epilogue: bytes, padding: bytes
) -> None:
    model = _part(b'form-data; name="model"', b"public")
    model = model.replace(BOUNDARY.encode() + b"\r\n", BOUNDARY.encode() + padding + b"\r\n", 1)
    body = prefix + _form(_audio_part(), model, epilogue=epilogue)
    form = read_form(body, CTYPE)
    assert form.model == "public"
    out = rewrite_form_model(body, form, "private")
    assert len(out) == len(body) + 1
    fields, files = _parse(out)
    assert (fields["model"], files["file"]) == (b"private", AUDIO)


def test_file_bytes_that_look_like_a_model_part_are_untouched() -> None:
    for parts in ((_audio_part(), _part(b'form-data; name="model"', b"public")),
                  (_part(b"form-data; name=model", b"public"), _audio_part())):
        body = _form(*parts)
        form = read_form(body, CTYPE)
        assert form.model == "public"
        assert "file" not in form.fields
        out = rewrite_form_model(body, form, "a-much-longer-backend-name")
        fields, files = _parse(out)
        assert fields == {"model": b"a-much-longer-backend-name"}
        assert files["file"] == AUDIO and len(files["file"]) == len(AUDIO)
        assert out.count(AUDIO) == 1


def test_large_file_with_partial_delimiters() -> None:
    rng = random.Random(7)
    noise = bytearray(rng.randbytes(1 << 20))
    for at in range(0, len(noise) - 64, 4099):  # near-misses of the delimiter
        cut = rng.randrange(1, len(BOUNDARY) + 4)
        piece = (b"\r\n--" + BOUNDARY.encode())[:cut]
        noise[at : at + len(piece)] = piece
    audio = bytes(noise)
    body = _form(_part(b'form-data; name="file"; filename="big.wav"', audio),
                 _part(b'form-data; name="model"', b"public"))
    form = read_form(body, CTYPE)
    assert form.model == "public"
    fields, files = _parse(rewrite_form_model(body, form, "private"))
    assert (fields["model"], files["file"]) == (b"private", audio)


def test_unicode_model_and_fields() -> None:
    body = _form(_part(b'form-data; name="prompt"', "héllo 模型".encode()),
                 _part(b'form-data; name="model"', "publíc/模型".encode()), _audio_part())
    form = read_form(body, CTYPE)
    assert form == Form(model="publíc/模型",
                        fields={"prompt": "héllo 模型", "model": "publíc/模型"},
                        model_span=form.model_span)
    fields, _ = _parse(rewrite_form_model(body, form, "privé/β"))
    assert fields["model"] == "privé/β".encode()


def test_text_fields_keep_the_last_repeated_value() -> None:
    body = _form(_part(b'form-data; name="timestamp_granularities[]"', b"word"),
                 _part(b'form-data; name="timestamp_granularities[]"', b"segment"),
                 _part(b'form-data; name="temperature"', b""),
                 _part(b'form-data; name="model"', b"m"), _audio_part())
    assert read_form(body, CTYPE).fields == {
        "timestamp_granularities[]": "segment", "temperature": "", "model": "m"}


@pytest.mark.parametrize(
    "parts",
    [
        (_part(b'form-data; name="model"', b"cheap"),
         _part(b'form-data; name="model"', b"premium")),
        (_part(b"form-data; name=model", b"cheap"), _audio_part(),
         _part(b'form-data; name="model"', b"premium")),
        (_part(b'form-data; name="model"', b""), _part(b'form-data; name="model"', b"premium")),
        (_part(b'form-data; name="model"', b"same"), _part(b"form-data; name=model", b"same")),
    ],
)
def test_duplicate_model_fields_are_refused(parts: tuple[bytes, ...]) -> None:
    assert _code(_form(*parts)) == "duplicate_model"


@pytest.mark.parametrize(
    "parts",
    [
        (_audio_part(),),
        (_audio_part(), _part(b'form-data; name="model"', b"")),
        (_audio_part(), _part(b'form-data; name="models"', b"m")),
        (),
    ],
)
def test_missing_model(parts: tuple[bytes, ...]) -> None:
    assert _code(_form(*parts)) == "missing_model"


def test_a_model_file_is_refused() -> None:
    part = _part(b'form-data; name="model"; filename="m.txt"', b"public")
    assert _code(_form(part, _audio_part())) == "invalid_model"


_GOOD = _form(_audio_part(), _part(b'form-data; name="model"', b"public"))


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"", CTYPE),
        (b"model=public", CTYPE),
        (b"\x00\xff garbage \r\n\r\n", CTYPE),
        (b'{"model": "public"}', CTYPE),
        (_GOOD, "multipart/form-data; boundary=other"),  # wrong boundary
        (_GOOD, "multipart/form-data"),  # no boundary
        (_GOOD, "multipart/form-data; boundary="),
        (_GOOD, "multipart/form-data; boundary=" + "x" * 300),
        (_GOOD, "application/x-www-form-urlencoded"),
        (_GOOD, "application/json"),
        (_GOOD, ""),
        (_GOOD, "multipart/form-data; boundary=é模"),
        (_GOOD, "multipart/form-data; boundary=\udcff"),
        (_GOOD, CTYPE + "; charset=latin-1"),
        (_GOOD, CTYPE + "; charset=bogus"),
        (_GOOD[:-20], CTYPE),  # truncated: no closing delimiter
        (_GOOD[: _GOOD.index(b"public") + 3], CTYPE),  # cut inside the model value
        (_GOOD.replace(b"\r\n", b"\n"), CTYPE),  # bare LF line ends
        (b"preamble\r\n" + _GOOD, CTYPE),
        (_form(b"--" + BOUNDARY.encode() + b"\r\n\r\npublic\r\n"), CTYPE),  # no headers
        (_form(_part(b"form-data", b"public")), CTYPE),  # no name
        (_form(_part(b"form-data; name=x; name=model", b"public")), CTYPE),
        (_form(_part(b"form-data; name*=UTF-8''model", b"public")), CTYPE),
        (_form(_part(b'form-data; name="x"', b"public",
                     b'Content-Disposition: form-data; name="model"')), CTYPE),
        (_form(_part(b'form-data; name="model"', b"public", b"Bad Header: x")), CTYPE),
    ],
)
def test_invalid_multipart(body: bytes, content_type: str) -> None:
    assert _code(body, content_type) == "invalid_multipart"


def test_quoted_boundary_and_utf8_charset_are_accepted() -> None:
    for content_type in (f'multipart/form-data; boundary="{BOUNDARY}"',
                         f"Multipart/Form-Data; charset=UTF-8; boundary={BOUNDARY}",
                         f"multipart/form-data;boundary={BOUNDARY};charset=utf8",
                         f"multipart/form-data; BOUNDARY={BOUNDARY}"):
        assert read_form(_GOOD, content_type).model == "public"


def test_a_line_break_cannot_be_spliced_into_the_form() -> None:
    form = read_form(_GOOD, CTYPE)
    with pytest.raises(ValueError, match="line break"):
        rewrite_form_model(_GOOD, form, "a\r\n--" + BOUNDARY)


def test_a_form_as_httpx_and_the_openai_sdk_send_it() -> None:
    request = httpx.Request("POST", "http://router/v1/audio/transcriptions",
                            data={"model": "public", "language": "en"},
                            files={"file": ("a.wav", AUDIO, "audio/wav")})
    body, content_type = request.read(), request.headers["content-type"]
    form = read_form(body, content_type)
    assert form.fields == {"model": "public", "language": "en"}
    out = rewrite_form_model(body, form, "private")
    assert read_form(out, content_type).model == "private"
    assert out.replace(b"private", b"public") == body
