"""Multipart (audio) requests through the router: the model is read as vLLM reads it."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import routes_yaml
from tests.harness import Router, start_router
from tests.payloads import WAV

RENAMED = ("  renamed-whisper:\n    backends:\n      - url: {url}\n"
           "    endpoints: [transcription]\n    backend_model: whisper-model\n")
BOUNDARY = "routeyard-test-boundary"


@pytest.fixture(scope="module")
def audio_router(engines: dict[str, str], tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Router]:
    extra = RENAMED.format(url=engines["transcription"])
    r = start_router(tmp_path_factory.mktemp("multipart"), routes_yaml(engines, extra))
    yield r
    r.stop()


def _form(*fields: tuple[str, str], audio: bytes = WAV, quote: bool = True) -> bytes:
    parts = []
    for name, value in fields:
        disposition = f'name="{name}"' if quote else f"name={name}"
        parts.append(f"--{BOUNDARY}\r\nContent-Disposition: form-data; {disposition}\r\n\r\n"
                     f"{value}\r\n".encode())
    parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
                 f'filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\n'.encode() + audio
                 + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def _post(router: Router, body: bytes) -> httpx.Response:
    return router.client.post("/v1/audio/transcriptions", content=body, headers={
        "content-type": f"multipart/form-data; boundary={BOUNDARY}"})


def _last_seen(engines: dict[str, str]) -> dict:
    return httpx.get(engines["transcription"] + "/_fake/requests").json()[-1]


@pytest.mark.parametrize("quote", [True, False])
def test_backend_model_rewrite_of_a_form(audio_router: Router, engines: dict, fake_only,
                                         quote: bool) -> None:
    """The engine gets the backend's name, quoted or unquoted ``name=model``, and the
    file's bytes are untouched even when they look like a model part."""
    audio = WAV + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\nrenamed-whisper'
    body = _form(("model", "renamed-whisper"), audio=audio, quote=quote)
    httpx.post(engines["transcription"] + "/_fake/reset")
    r = _post(audio_router, body)
    assert r.status_code == 200, r.text
    seen = _last_seen(engines)
    assert seen["form"]["model"] == "whisper-model"
    assert seen["file_size"] == len(audio)
    assert seen["body_len"] == len(body) - len("renamed-whisper") + len("whisper-model")


def test_duplicate_model_fields_are_refused(audio_router: Router, engines: dict,
                                            fake_only) -> None:
    """vLLM reads the last ``model`` field; the router refuses two rather than authorize
    one name and serve another."""
    httpx.post(engines["transcription"] + "/_fake/reset")
    r = _post(audio_router, _form(("model", "whisper-model"), ("model", "renamed-whisper")))
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "duplicate_model"
    assert httpx.get(engines["transcription"] + "/_fake/requests").json() == []


def test_malformed_form_is_a_400(audio_router: Router) -> None:
    r = audio_router.client.post("/v1/audio/transcriptions", content=b"--x\r\nnot a form", headers={
        "content-type": "multipart/form-data; boundary=other"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_multipart"
