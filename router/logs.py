"""The process's log lines: one format in the main process and in every worker.

``configure`` is called by ``routeyard serve`` in the main process and by ``create_app``
in each worker process Sanic starts (a worker is a fresh interpreter that inherits no
logging set-up), so the router's loggers and Sanic's own (``sanic.root``, ``sanic.error``,
``sanic.server``, which propagate to the root logger) share one handler on stderr.

A text line is ``TIME LEVEL WORKER LOGGER: MESSAGE``; with ``ROUTEYARD_LOG_FORMAT=json``
each line is one JSON object with ``time``, ``level``, ``logger``, ``worker``, ``pid``,
``message`` and any ``extra=`` fields of the call. Times are UTC ISO 8601 with
milliseconds, as in the access log. ``WORKER`` is Sanic's name of the worker process
(``Sanic-Server-0-0``, ``Sanic-Server-1-0``, …) or ``main`` for the process that
``routeyard serve`` started (the only one with ``--workers 1``).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import Any, TextIO

import orjson

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = ("text", "json")
#: The worker name of the process ``routeyard serve`` started.
MAIN = "main"
#: Attributes every ``LogRecord`` has; any other attribute came from ``extra=``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "worker", "taskName"}
#: Sanic colours some of its messages when stderr is a terminal.
_CONTROL = re.compile(r"\033\[[0-9;]*\w")
#: Chatty libraries kept at WARNING unless the level is DEBUG (watchfiles logs each change).
_QUIET = ("watchfiles",)


def worker_name() -> str:
    """This process's worker name: Sanic's, in a worker it started, else ``main``."""
    return os.environ.get("SANIC_WORKER_NAME") or MAIN


def leads(name: str) -> bool:
    """Whether the process named ``name`` speaks for all workers about what each of them
    does alike (reloads, DNS changes): the main process, or Sanic's first worker."""
    return name == MAIN or name.startswith("Sanic-Server-0-")


class TextFormatter(logging.Formatter):
    """``TIME LEVEL WORKER LOGGER: MESSAGE``, UTC ISO 8601 times."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(worker)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                + f".{int(record.msecs):03d}Z")

    def format(self, record: logging.LogRecord) -> str:
        if record.name.startswith("sanic.") and isinstance(record.msg, str):
            record.msg = _CONTROL.sub("", record.msg)
        return super().format(record)


class JsonFormatter(TextFormatter):
    """One JSON object per line: the fields of the module docstring."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.name.startswith("sanic."):
            message = _CONTROL.sub("", message)
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "worker": getattr(record, "worker", MAIN),
            "pid": record.process,
            "message": message,
        }
        entry.update((k, v) for k, v in record.__dict__.items() if k not in _STANDARD)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry, default=str).decode()


class _WorkerFilter(logging.Filter):
    """Stamps each record with the worker name (a handler filter: it sees every record
    that reaches the handler, those of child loggers included)."""

    def __init__(self, worker: str) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        return True


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The one handler ``configure`` installs (told apart from others, e.g. pytest's)."""


def configure(level: str, fmt: str = "text", worker: str | None = None,
              stream: TextIO | None = None) -> None:
    """Send every log record of this process at ``level`` or above to ``stream`` (stderr)
    in ``fmt``; idempotent (replaces only the handler an earlier call installed)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(handler)
    handler = _Handler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_WorkerFilter(worker or worker_name()))
    root.addHandler(handler)
    numeric = logging.getLevelName(level.upper())
    root.setLevel(numeric)
    for name in _QUIET:
        logging.getLogger(name).setLevel(numeric if numeric == logging.DEBUG
                                         else max(numeric, logging.WARNING))
