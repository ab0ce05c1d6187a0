"""``POST /v1/files``: a multipart upload streamed into object storage.

The body is read chunk by chunk from Sanic's request stream, parsed by python-multipart's
streaming parser, and the ``file`` part goes straight into an obstore multipart put
through a small queue (backpressure: the client is read no faster than storage takes it).
Every upload is checked as JSONL on the way (``purpose`` may come after the file); the
verdict counts only for ``purpose=batch``. A rejected upload leaves no object behind.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from router.batch.errors import FileTooLarge, InvalidFile
from router.batch.jsonl import JsonlCheck
from router.batch.models import UPLOAD_PURPOSES, new_id
from router.batch.objects import Objects

if TYPE_CHECKING:
    from sanic import Request

    from router.batch.service import BatchService

FIELD_LIMIT = 64 * 1024
FORM_OVERHEAD = 1024 * 1024  # boundaries, part headers and small fields around the file
QUEUE_CHUNKS = 8


class _Form:
    """python-multipart callbacks: small fields into a dict, file data into a list."""

    def __init__(self) -> None:
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.file_started = False
        self.pending: list[bytes] = []
        self.error: str | None = None
        self._headers: dict[bytes, bytes] = {}
        self._header = b""
        self._value = b""
        self._name: str | None = None
        self._in_file = False
        self._buffer = bytearray()

    def callbacks(self) -> Any:  # python-multipart's MultipartCallbacks
        return {
            "on_part_begin": self._part_begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._headers, self._header, self._value = {}, b"", b""
        self._buffer.clear()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header.lower()] = self._value
        self._header, self._value = b"", b""

    def _headers_finished(self) -> None:
        _kind, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        self._in_file = self._name == "file"
        if self._in_file:
            if self.file_started:
                self.error = "The form has more than one `file` part; send one file per upload."
            self.file_started = True
            raw = options.get(b"filename", b"file") or b"file"
            self.filename = raw.decode("utf-8", "replace").rsplit("/", 1)[-1][:1024]

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self.pending.append(bytes(data[start:end]))
        elif len(self._buffer) + end - start <= FIELD_LIMIT:
            self._buffer += data[start:end]
        else:
            self.error = f"The form field `{self._name}` is longer than {FIELD_LIMIT} bytes."

    def _part_end(self) -> None:
        if not self._in_file and self._name:
            self.fields[self._name] = self._buffer.decode("utf-8", "replace")
        self._in_file = False


async def _queue_iter(queue: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
    while (chunk := await queue.get()) is not None:
        yield chunk


async def _send(queue: asyncio.Queue[bytes | None], item: bytes | None,
                put: asyncio.Task[None]) -> None:
    """Queue ``item`` for the upload; raise the upload's error if it died first."""
    waiter = asyncio.ensure_future(queue.put(item))
    await asyncio.wait({waiter, put}, return_when=asyncio.FIRST_COMPLETED)
    if not waiter.done():
        waiter.cancel()
        put.result()
        raise RuntimeError("the storage upload ended early")


async def receive(request: Request, service: BatchService, tenant: str | None) -> dict[str, Any]:
    """Read a multipart upload into storage; the new FileObject."""
    config = service.config
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise InvalidFile("POST /v1/files takes multipart/form-data with the fields `file` and "
                          "`purpose`.")
    stream: Any = request.stream  # Sanic's Http object on a stream=True route
    if stream is not None:
        stream.request_max_size = config.max_file_bytes + FORM_OVERHEAD
    form = _Form()
    parser = MultipartParser(boundary, form.callbacks())
    check = JsonlCheck(config.max_line_bytes, config.max_requests)
    file_id = new_id("file-")
    key = Objects.key(file_id)
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE_CHUNKS)
    put: asyncio.Task[None] | None = None
    size = 0
    try:
        while stream is not None and (chunk := await stream.read()) is not None:
            try:
                parser.write(chunk)
            except MultipartParseError as exc:
                raise InvalidFile(f"The multipart body is malformed: {exc}.") from None
            if form.error:
                raise InvalidFile(form.error)
            if form.file_started and put is None:
                put = asyncio.create_task(service.objects.put_stream(key, _queue_iter(queue)))
            limit = (config.max_batch_file_bytes if form.fields.get("purpose") == "batch"
                     else config.max_file_bytes)
            for piece in form.pending:
                size += len(piece)
                if size > limit:
                    raise FileTooLarge(f"The file is larger than {limit} bytes, the limit for "
                                       "this purpose.", param="file")
                check.feed(piece)
                assert put is not None
                await _send(queue, piece, put)
            form.pending.clear()
        parser.finalize()
        if put is None:
            raise InvalidFile("The form has no `file` part.", param="file")
        await _send(queue, None, put)
        await put
        values = _describe(form, check, size, service)
        return await service.add_file(tenant, {**values, "id": file_id, "object_key": key})
    except BaseException:
        if put is not None:
            put.cancel()
            with contextlib.suppress(BaseException):
                await put
            await service.objects.delete(key)
        raise


def _describe(form: _Form, check: JsonlCheck, size: int,
              service: BatchService) -> dict[str, Any]:
    """The file row's values, once the whole form is in; raises if the file is unusable."""
    purpose = form.fields.get("purpose")
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidFile(f"purpose {purpose!r} is not one of {', '.join(UPLOAD_PURPOSES)}.",
                          param="purpose")
    lines = None
    if purpose == "batch":
        if size > service.config.max_batch_file_bytes:
            raise FileTooLarge(f"A batch file may be at most {service.config.max_batch_file_bytes}"
                               " bytes.", param="file")
        check.end()
        if check.error:
            raise InvalidFile(check.error, param="file")
        lines = check.requests
    now = service.now()
    expires_at = None
    anchor = form.fields.get("expires_after[anchor]")
    seconds = form.fields.get("expires_after[seconds]")
    if anchor is not None or seconds is not None:
        if anchor != "created_at" or not (seconds or "").isdigit() or \
                not 3600 <= int(seconds or 0) <= 2_592_000:
            raise InvalidFile("expires_after needs anchor=created_at and seconds from 3600 to "
                              "2592000.", param="expires_after")
        expires_at = now + int(seconds or 0)
    return {"purpose": purpose, "filename": form.filename or "file", "bytes": size,
            "lines": lines, "created_at": now, "expires_at": expires_at, "status": "processed"}
