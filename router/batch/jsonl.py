"""JSON Lines over byte streams: split without buffering the file, check at upload.

Lines are numbered from 1 by physical line, blank ones included, so a number in an
error message is the one an editor shows. Blank lines carry no request and are skipped.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

import orjson


class LineTooLong(ValueError):
    def __init__(self, line: int, limit: int) -> None:
        super().__init__(f"Line {line} is longer than {limit} bytes (max_line_bytes).")
        self.line = line


class LineSplitter:
    """Feed chunks, get complete lines (without ``\\n`` or ``\\r``)."""

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self.count = 0  # lines returned so far
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, chunk: bytes) -> list[bytes]:
        if b"\n" not in chunk:
            self._hold(chunk)
            return []
        pieces = chunk.split(b"\n")
        if self._parts:
            self._hold(pieces[0])
            pieces[0] = b"".join(self._parts)
            self._parts, self._size = [], 0
        elif len(pieces[0]) > self.max_line:
            raise LineTooLong(self.count + 1, self.max_line)
        tail = pieces.pop()
        for i, piece in enumerate(pieces):
            if len(piece) > self.max_line:
                raise LineTooLong(self.count + i + 1, self.max_line)
        self.count += len(pieces)
        if tail:
            self._hold(tail)
        return [p[:-1] if p.endswith(b"\r") else p for p in pieces]

    def end(self) -> list[bytes]:
        """The last line when the stream does not end with a newline."""
        if not self._parts:
            return []
        last = b"".join(self._parts)
        self._parts, self._size = [], 0
        self.count += 1
        return [last[:-1] if last.endswith(b"\r") else last]

    def _hold(self, piece: bytes) -> None:
        self._size += len(piece)
        if self._size > self.max_line:
            raise LineTooLong(self.count + 1, self.max_line)
        self._parts.append(piece)


async def iter_lines(chunks: AsyncIterable[bytes],
                     max_line: int) -> AsyncIterator[tuple[int, bytes]]:
    """``(line number, line)`` for every line of the stream, blank ones included."""
    splitter = LineSplitter(max_line)
    number = 0
    async for chunk in chunks:
        for line in splitter.feed(chunk):
            number += 1
            yield number, line
    for line in splitter.end():
        number += 1
        yield number, line


class JsonlCheck:
    """The upload-time check of a ``batch`` file: every non-blank line a JSON object.

    Runs on every upload because ``purpose`` may arrive after the file in the form;
    the verdict is read at the end. After the first bad line only bytes are counted.
    """

    def __init__(self, max_line: int, max_requests: int) -> None:
        self.splitter = LineSplitter(max_line)
        self.max_requests = max_requests
        self.requests = 0
        self.error: str | None = None
        self.error_line: int | None = None

    def feed(self, chunk: bytes) -> None:
        if self.error is not None:
            return
        try:
            first = self.splitter.count + 1
            for offset, line in enumerate(self.splitter.feed(chunk)):
                self._check(first + offset, line)
        except LineTooLong as exc:
            self._fail(exc.line, str(exc))

    def end(self) -> None:
        if self.error is not None:
            return
        try:
            first = self.splitter.count + 1
            for line in self.splitter.end():
                self._check(first, line)
        except LineTooLong as exc:
            self._fail(exc.line, str(exc))
        if self.error is None and self.requests == 0:
            self.error = "The file has no requests; a batch file has one JSON object per line."

    def _check(self, number: int, line: bytes) -> None:
        if self.error is not None or not line.strip():
            return
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            self._fail(number, f"Line {number} is not valid JSON: {exc}.")
            return
        if not isinstance(value, dict):
            self._fail(number, f"Line {number} is JSON but not an object; each line must be "
                               '{"custom_id", "method", "url", "body"}.')
            return
        self.requests += 1
        if self.requests > self.max_requests:
            self._fail(number, f"The file has more than {self.max_requests} requests, the "
                               "limit for one batch; split it into several files.")

    def _fail(self, number: int, message: str) -> None:
        self.error, self.error_line = message, number
