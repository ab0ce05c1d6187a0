"""Model names are read once and rewritten in place, leaving every other byte alone."""

from __future__ import annotations

import orjson
import pytest

from router.errors import BadRequest
from router.model_field import model_from_json, rewrite_form_model, rewrite_json_model


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"a","messages":[]}',
        b'{ "messages": [{"model": "a"}], "model" : "a" }',
        b'{"x": "\\"model\\": \\"a\\"", "model":"a"}',
        b'{"tools": {"model": {"model": "a"}}, "n": [1, {"model": "a"}], "model": "a", "z": 1}',
        b'{"a":"model","model":"a"}',
    ],
)
def test_rewrite_touches_only_the_top_level_model(body: bytes) -> None:
    assert model_from_json(body)[0] == "a"
    out = rewrite_json_model(body, "backend/é")
    parsed, original = orjson.loads(out), orjson.loads(body)
    assert parsed.pop("model") == "backend/é"
    original.pop("model")
    assert parsed == original
    assert len(out) - len(body) == len(orjson.dumps("backend/é")) - len(b'"a"')


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b"{}", b'{"model": null}', b'{"model": 1}'])
def test_bad_bodies(body: bytes) -> None:
    with pytest.raises(BadRequest):
        model_from_json(body)


def test_form_rewrite() -> None:
    body = (b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            b"Content-Type: audio/wav\r\n\r\nRIFF model\r\n"
            b"--xyz\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\npublic\r\n"
            b"--xyz--\r\n")
    out = rewrite_form_model(body, "private")
    assert out == body.replace(b"\r\n\r\npublic\r\n", b"\r\n\r\nprivate\r\n")
