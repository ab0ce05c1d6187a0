"""router.proxy's admit phase and head checks, and the limiter as a sink: which model a
request gets, what it is refused for, the body and balancing key it leaves with, and
what the tenant limiter is charged. No sockets: a snapshot over MockTransport backends."""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from router.errors import ClientError, EndpointNotEnabled, ModelNotFound, PayloadTooLarge
from router.model_field import model_from_json, read_form
from router.proxy import Admitted, LimiterSink, admit, check_head
from router.record import Record
from router.snapshot import Snapshot
from router.tenants.buckets import Admission, LocalLimiter
from router.tenants.config import Limits
from router.tenants.errors import RateLimited
from router.tenants.keys import Tenant
from router.tenants.limits import estimate_tokens
from tests.unit.core import Fleet, model_lines, snapshot_of

ROUTES = "\n".join([
    "models:",
    *model_lines("m", ["a"], "backend_model: engine-m"),
    *model_lines("same", ["a"], "backend_model: same"),
    *model_lines("plain", ["a", "b"], "max_body_size: 64"),
    *model_lines("sess", ["a", "b"], "policy: session"),
    *model_lines("conv", ["a", "b"], "policy: session\nsession: {header: X-Conversation}"),
    *model_lines("pre", ["a", "b"], "policy: prefix\nprefix: {chars: 8}"),
    *model_lines("whisper", ["a"], "backend_model: whisper-large",
                 endpoints="[transcription]"),
]) + "\n"


@pytest.fixture
async def snap() -> Snapshot:
    return await snapshot_of(ROUTES, Fleet())


class Allow:
    """A ``Principal`` that may use the models named."""

    def __init__(self, *models: str) -> None:
        self.models = set(models)

    def can_use(self, model: str) -> bool:
        return model in self.models


def tenant(rpm: int | None = None, tpm: int | None = None, models: str = "m") -> Tenant:
    return Tenant(key_id="key-1", tenant_id="team-1", admin=False,
                  limits=Limits(rpm=rpm, tpm=tpm), exact_models=frozenset(models.split()),
                  model_pattern=None, model_limits=())


def new_record(group: str = "chat", path: str = "/v1/chat/completions",
               headers: Mapping[str, str] | None = None) -> Record:
    return Record(method="POST", path=path, headers=headers or {}, group=group,
                  operation="chat", request_id="req-1", t0=0.0, bytes_in=0)


async def admit_json(snap: Snapshot, body: bytes, *, group: str = "chat",
                     path: str = "/v1/chat/completions", record: Record | None = None,
                     principal: Any = None, limited: Tenant | None = None,
                     limiter: Any = None, headers: Mapping[str, str] | None = None,
                     placement: Any = None) -> Admitted:
    name, data = model_from_json(body)
    return await admit(snap, group, path, name, data, body,
                       record if record is not None else new_record(group, path),
                       principal=principal, limited=limited,
                       limiter=limiter if limiter is not None else LocalLimiter(),
                       headers=headers or {}, placement=placement)


# -- which model ---------------------------------------------------------------------------------
async def test_unknown_model_is_not_found(snap: Snapshot) -> None:
    record = new_record()
    with pytest.raises(ModelNotFound) as caught:
        await admit_json(snap, b'{"model":"nope"}', record=record)
    assert caught.value.status == 404
    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"
    assert record.model == "nope"
    assert record.label_model == ""
    assert record.backend_model is None


async def test_a_huge_unknown_name_is_recorded_short(snap: Snapshot) -> None:
    """The record feeds the access log and traces: a megabyte name must not reach them."""
    record = new_record()
    with pytest.raises(ModelNotFound):
        await admit_json(snap, b'{"model":"' + b"x" * 1_000_000 + b'"}', record=record)
    assert record.model is not None and len(record.model) <= 300


async def test_model_hidden_from_the_principal_gets_the_same_error(snap: Snapshot) -> None:
    with pytest.raises(ModelNotFound) as unknown:
        await admit_json(snap, b'{"model":"ghost"}', principal=Allow("plain"))
    record = new_record()
    with pytest.raises(ModelNotFound) as hidden:
        await admit_json(snap, b'{"model":"m"}', principal=Allow("plain"), record=record)
    assert str(hidden.value) == str(unknown.value).replace("ghost", "m")
    assert hidden.value.body() == unknown.value.body().replace(b"ghost", b"m")
    assert (hidden.value.status, hidden.value.code) == (404, "model_not_found")
    assert record.label_model == ""  # nothing about the model leaks into metrics either
    assert record.backend_model is None
    admitted = await admit_json(snap, b'{"model":"m"}', principal=Allow("m"))
    assert admitted.model is snap.models["m"]


async def test_group_not_enabled_for_the_model(snap: Snapshot) -> None:
    record = new_record("embeddings", "/v1/embeddings")
    with pytest.raises(EndpointNotEnabled) as caught:
        await admit_json(snap, b'{"model":"m","input":"x"}', group="embeddings",
                         path="/v1/embeddings", record=record)
    assert caught.value.status == 403
    assert caught.value.code == "endpoint_not_enabled"
    assert "/v1/embeddings" in caught.value.message
    assert "chat, responses" in caught.value.message
    assert record.label_model == "m"


async def test_body_over_max_body_size_is_refused(snap: Snapshot) -> None:
    def body(size: int) -> bytes:
        head = b'{"model":"plain","x":"'
        return head + b"y" * (size - len(head) - 2) + b'"}'

    admitted = await admit_json(snap, body(64))
    assert len(admitted.body) == 64
    with pytest.raises(PayloadTooLarge) as caught:
        await admit_json(snap, body(65))
    assert caught.value.status == 413
    assert "65 bytes" in caught.value.message
    assert "at most 64" in caught.value.message


# -- the body and the balancing key --------------------------------------------------------------
async def test_backend_model_rewrites_only_the_top_level_model(snap: Snapshot) -> None:
    body = b'{"model" : "m", "messages": [{"role": "user", "content": "\\"model\\": m"}]}'
    record = new_record()
    admitted = await admit_json(snap, body, record=record)
    assert admitted.body == (
        b'{"model" : "engine-m", "messages": [{"role": "user", "content": "\\"model\\": m"}]}')
    assert (record.model, record.label_model, record.backend_model) == ("m", "m", "engine-m")


async def test_without_backend_model_the_body_is_unchanged(snap: Snapshot) -> None:
    for name in ("plain", "same"):  # none, or the public name itself
        body = b'{"model":"%s","messages":[]}' % name.encode()
        record = new_record()
        admitted = await admit_json(snap, body, record=record)
        assert admitted.body is body
        assert (record.model, record.label_model, record.backend_model) == (name, name, None)


async def test_backend_model_rewrites_the_form_field(snap: Snapshot) -> None:
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            b"Content-Type: audio/wav\r\n\r\nRIFF\r\n--XyZ--\r\n")
    record = new_record("transcription", "/v1/audio/transcriptions")
    form = read_form(body, "multipart/form-data; boundary=XyZ")
    admitted = await admit(snap, "transcription", "/v1/audio/transcriptions", form.model,
                           dict(form.fields), body, record, principal=None, limited=None,
                           limiter=LocalLimiter(), headers={}, form=form)
    assert admitted.body == body.replace(b"\r\n\r\nwhisper\r\n", b"\r\n\r\nwhisper-large\r\n")
    assert record.backend_model == "whisper-large"


@pytest.mark.parametrize(("model", "headers", "user", "key"), [
    ("sess", {"x-session-id": "s-1"}, "u-1", "s-1"),  # the header first
    ("sess", {}, "u-1", "u-1"),  # then the body's user
    ("sess", {"x-session-id": ""}, "u-1", "u-1"),
    ("sess", {}, None, None),
    ("sess", {}, 42, None),  # not a string: no key
    ("conv", {"x-conversation": "c-9", "x-session-id": "s-1"}, "u-1", "c-9"),
    ("plain", {"x-session-id": "s-1"}, "u-1", None),  # round robin takes no key
])
async def test_session_key_from_header_then_body_user(
        snap: Snapshot, model: str, headers: dict[str, str], user: object,
        key: str | None) -> None:
    body: dict[str, Any] = {"model": model, "messages": []}
    if user is not None:
        body["user"] = user
    admitted = await admit_json(snap, orjson.dumps(body), headers=headers)
    assert admitted.key == key


async def test_prefix_key_is_the_start_of_the_prompt(snap: Snapshot) -> None:
    chat = await admit_json(snap, b'{"model":"pre","messages":[{"role":"user",'
                                  b'"content":"hello world"},{"role":"user","content":"x"}]}')
    assert chat.key == "user:hel"
    completion = await admit_json(snap, b'{"model":"pre","prompt":"once upon a time"}')
    assert completion.key == "once upo"
    empty = await admit_json(snap, b'{"model":"pre","prompt":""}')
    assert empty.key is None


async def test_placement_is_made_for_the_model_and_body(snap: Snapshot) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []
    marker = object()

    def placement(model: str, data: dict[str, Any]) -> Any:
        seen.append((model, data))
        return marker

    admitted = await admit_json(snap, b'{"model":"m","input":"hi"}', group="responses",
                                path="/v1/responses", placement=placement)
    assert admitted.placement is marker
    assert seen == [("m", {"model": "m", "input": "hi"})]
    plain = await admit_json(snap, b'{"model":"m","input":"hi"}')
    assert plain.placement is None


# -- tenant limits -------------------------------------------------------------------------------
async def test_limited_tenant_gets_an_admission_and_its_headers(snap: Snapshot) -> None:
    limiter = LocalLimiter(clock=lambda: 1000.0)
    key = tenant(rpm=2, tpm=1000)
    body = b'{"model":"m","max_tokens":50}'
    record = new_record()
    admitted = await admit_json(snap, body, record=record, principal=key, limited=key,
                                limiter=limiter)
    admission = record.admission
    assert isinstance(admission, Admission)
    assert (admission.key_id, admission.model, admission.via) == ("key-1", "m", "local")
    # the estimate is of the body as sent to the engine (model rewritten)
    assert admission.estimated_tokens == estimate_tokens(len(admitted.body),
                                                         {"max_tokens": 50})
    assert admitted.headers == list(admission.headers.items())
    headers = dict(admitted.headers)
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "1"
    assert headers["x-ratelimit-limit-tokens"] == "1000"
    assert headers["x-ratelimit-remaining-tokens"] == str(1000 - admission.estimated_tokens)

    await admit_json(snap, body, principal=key, limited=key, limiter=limiter)
    with pytest.raises(RateLimited) as caught:
        await admit_json(snap, body, principal=key, limited=key, limiter=limiter)
    assert caught.value.status == 429
    assert caught.value.type == "requests"
    assert caught.value.headers["x-ratelimit-remaining-requests"] == "0"
    assert int(caught.value.headers["retry-after"]) >= 1


async def test_unlimited_request_has_no_admission(snap: Snapshot) -> None:
    record = new_record()
    admitted = await admit_json(snap, b'{"model":"m"}', record=record)
    assert record.admission is None
    assert admitted.headers is None


async def test_refused_request_is_not_charged(snap: Snapshot) -> None:
    limiter = LocalLimiter(clock=lambda: 1000.0)
    key = tenant(rpm=1, models="m plain")
    with pytest.raises(EndpointNotEnabled):
        await admit_json(snap, b'{"model":"m"}', group="embeddings", path="/v1/embeddings",
                         principal=key, limited=key, limiter=limiter)
    with pytest.raises(ModelNotFound):
        await admit_json(snap, b'{"model":"sess"}', principal=key, limited=key,
                         limiter=limiter)
    admitted = await admit_json(snap, b'{"model":"m"}', principal=key, limited=key,
                                limiter=limiter)
    assert dict(admitted.headers or [])["x-ratelimit-remaining-requests"] == "0"


# -- the limiter as a sink -------------------------------------------------------------------------
class RecordingLimiter:
    def __init__(self) -> None:
        self.recorded: list[tuple[Any, int | None]] = []

    async def record(self, admission: Any, actual_tokens: int | None) -> None:
        self.recorded.append((admission, actual_tokens))


USAGE = b'{"usage":{"prompt_tokens":10,"completion_tokens":20,"total_tokens":30}}'


def finished(admission: object, *, failed: BaseException | None = None,
             reads_usage: bool = True) -> Record:
    record = Record(method="POST", path="/v1/chat/completions", headers={}, group="chat",
                    operation="chat", request_id="r", t0=0.0, bytes_in=0,
                    reads_usage=reads_usage)
    record.admission = admission
    record.outcome.status = 200
    record.outcome.body(USAGE, "application/json")
    record.ended(failed)
    return record


@pytest.mark.parametrize(("failed", "reads_usage", "tokens"), [
    (None, True, 30),  # what the answer reported
    (ClientError("bad"), True, None),  # failed: the estimate stands
    (None, False, 0),  # a stored answer, counted when it was made
])
async def test_limiter_sink_records_the_reported_tokens(
        failed: BaseException | None, reads_usage: bool, tokens: int | None) -> None:
    limiter = RecordingLimiter()
    admission = Admission("key-1", "m", 5)
    pending = LimiterSink(limiter).finish(  # type: ignore[arg-type]
        finished(admission, failed=failed, reads_usage=reads_usage))
    assert pending is not None
    assert limiter.recorded == []  # the awaitable does the work, shielded by settle
    await pending
    assert limiter.recorded == [(admission, tokens)]


def test_limiter_sink_skips_requests_without_an_admission() -> None:
    limiter = RecordingLimiter()
    assert LimiterSink(limiter).finish(finished(None)) is None  # type: ignore[arg-type]
    assert limiter.recorded == []


async def test_limiter_sink_corrects_the_local_token_bucket(snap: Snapshot) -> None:
    limiter = LocalLimiter(clock=lambda: 1000.0)
    key = tenant(tpm=1000)
    record = new_record()
    await admit_json(snap, b'{"model":"m"}', record=record, principal=key, limited=key,
                     limiter=limiter)
    record.outcome.body(USAGE.replace(b"20", b"290"), "application/json")  # 300 tokens
    record.ended(None)
    pending = LimiterSink(limiter).finish(record)
    assert pending is not None
    await pending
    second = new_record()
    admitted = await admit_json(snap, b'{"model":"m"}', record=second, principal=key,
                                limited=key, limiter=limiter)
    remaining = dict(admitted.headers or [])["x-ratelimit-remaining-tokens"]
    assert remaining == str(1000 - 300 - second.admission.estimated_tokens)


# -- the head (its bytes are checked by router.listener: tests/integration/test_client_attacks.py)
def test_check_head_keeps_the_client_request_id() -> None:
    request = SimpleNamespace(headers={"x-request-id": "abc"}, ctx=SimpleNamespace())
    assert check_head(request) == "abc"  # type: ignore[arg-type]
    assert request.ctx.request_id == "abc"


def test_safe_head_without_an_id_gets_a_new_one() -> None:
    ids = set()
    for _ in range(3):
        request = SimpleNamespace(head=b"GET / HTTP/1.1\r\n\r\n", headers={},
                                  ctx=SimpleNamespace())
        request_id = check_head(request)  # type: ignore[arg-type]
        assert re.fullmatch(r"[0-9a-f]{12}-[0-9a-f]+", request_id)
        assert request.ctx.request_id == request_id
        ids.add(request_id)
    assert len(ids) == 3
