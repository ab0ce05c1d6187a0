"""Handlers for the transcription task: /v1/audio/transcriptions and /translations.

Bodies are multipart forms (``file``, ``model``, ``response_format``, ``stream``,
``stream_include_usage``, ...). Like vLLM, every non-streamed format, text/srt/vtt
included, is answered as a JSON object; streams are ``data:`` chunks then ``[DONE]``.
"""

from __future__ import annotations

import math
from typing import Any

from sanic import HTTPResponse

import router.fake_engine.formats as fmt
import router.fake_engine.tokens as tokens
from router.fake_engine.call import Call, Stream
from router.fake_engine.generate import flag
from router.fake_engine.state import EngineError, missing_field, validation_error

FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
BYTES_PER_SECOND = 32_000  # 16 kHz, 16-bit mono


def _stamp(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    hours, minutes, secs = ms // 3_600_000, ms // 60_000 % 60, ms // 1000 % 60
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{sep}{ms % 1000:03d}"


def subtitles(text: str, duration: float, kind: str) -> str:
    if kind == "srt":
        return f"1\n{_stamp(0, ',')} --> {_stamp(duration, ',')}\n{text}\n"
    return f"WEBVTT\n\n{_stamp(0, '.')} --> {_stamp(duration, '.')}\n{text}\n"


def form_fields(call: Call) -> tuple[dict[str, Any], bytes]:
    """The form's fields (first values) and the uploaded file, validated as vLLM does."""
    request = call.request
    fields = {k: v[0] for k, v in request.form.items()} if request.form else {}
    upload = request.files.get("file") if request.files else None
    if upload is None:
        if "file" in fields:
            raise EngineError(422, "Unprocessable Entity",
                              "Expected 'file' to be a file-like object, not 'str'.")
        raise missing_field(("body", "file"))
    fmt_name = fields.get("response_format") or "json"
    if fmt_name not in FORMATS:
        detail = {"type": "literal_error", "loc": ("body", "response_format"),
                  "msg": "Input should be 'json', 'text', 'srt', 'verbose_json' or 'vtt'"}
        raise validation_error(str(detail), "body.response_format")
    if not flag(fields.get("stream")):
        for option in ("stream_include_usage", "stream_continuous_usage_stats"):
            if flag(fields.get(option)):
                raise validation_error(
                    "Value error, Stream options can only be defined when `stream=True`.",
                    option)
    return fields, upload.body


async def speech_to_text(call: Call, task: str) -> HTTPResponse | None:
    """``task`` is "transcribe" or "translate"; only transcriptions report usage."""
    fields, audio = form_fields(call)
    model = call.state.resolve_model(fields.get("model"))
    response_format = fields.get("response_format") or "json"
    stream = flag(fields.get("stream"))
    if response_format == "verbose_json" and stream:
        raise EngineError(400, "BadRequestError",
                          "verbose_json format doesn't support streaming case")
    limit_raw = fields.get("max_completion_tokens")
    limit = int(limit_raw) if limit_raw and str(limit_raw).isdigit() else None
    n = call.token_count(limit)
    words = tokens.generate(tokens.seed_of(audio), n)
    text = "".join(words)
    duration = max(1.0, len(audio) / BYTES_PER_SECOND)
    rid = call.request_id(task)
    if stream:
        await _stream(call, task, rid, model, words, limit, fields)
        return None
    await call.generation_time(n)
    if response_format == "verbose_json":
        segment = {"id": 0, "avg_logprob": -0.1, "compression_ratio": 1.0, "end": duration,
                   "no_speech_prob": None, "seek": 0, "start": 0.0, "temperature": 0.0,
                   "text": text, "tokens": tokens.tokenize(text)[:n]}
        return await call.reply({"duration": str(duration), "language": fields.get("language")
                                 or "en", "text": text, "segments": [segment], "words": None})
    if response_format in ("srt", "vtt"):
        text = subtitles(text, duration, response_format)
    body: dict[str, Any] = {"text": text}
    if task == "transcribe":
        body["usage"] = {"type": "duration", "seconds": math.ceil(duration)}
    return await call.reply(body)


async def _stream(call: Call, task: str, rid: str, model: str, words: list[str],
                  limit: int | None, fields: dict[str, Any]) -> None:
    include_usage = flag(fields.get("stream_include_usage"))
    continuous = include_usage and flag(fields.get("stream_continuous_usage_stats"))
    prompt_tokens = 1
    finish = fmt.finish_reason(len(words), limit)
    head = {"id": rid, "object": "transcription.chunk" if task == "transcribe"
            else "translation.chunk", "created": call.created, "model": model}
    out = Stream(call)
    await out.open()
    for i, word in enumerate(words or [""]):
        if words and not await out.pace(i):
            return
        choice: dict[str, Any] = {"delta": {"content": word}}
        if i == len(words) - 1 or not words:
            choice.update(finish_reason=finish, stop_reason=None)
        chunk: dict[str, Any] = {**head, "choices": [choice]}
        if continuous:
            chunk["usage"] = fmt.usage(prompt_tokens, i + 1 if words else 0)
        await out.data(chunk)
    if include_usage:
        await out.data({**head, "choices": [], "usage": fmt.usage(prompt_tokens, len(words))})
    await out.done()


async def transcriptions(call: Call) -> HTTPResponse | None:
    return await speech_to_text(call, "transcribe")


async def translations(call: Call) -> HTTPResponse | None:
    return await speech_to_text(call, "translate")
