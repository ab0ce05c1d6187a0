"""router/logs.py and the process settings it reads, in-process: the text and JSON line
formats, ``configure`` (idempotent, leaves other handlers alone), who speaks for the
workers, and the one-line description of refused settings."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator

import orjson
import pytest
from pydantic import ValidationError

from router import logs
from router.settings import Settings, describe

#: ``TIME LEVEL WORKER LOGGER: MESSAGE`` (router/logs.py).
TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
    r"(main|Sanic-Server-\d+-\d+) [\w.]+: .+$")


@pytest.fixture
def stderr() -> Iterator[io.StringIO]:
    """Where ``configure`` (below) writes; the root logger is restored after."""
    root, quiet = logging.getLogger(), logging.getLogger("watchfiles")
    levels, handlers = (root.level, quiet.level), list(root.handlers)
    yield io.StringIO()
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(levels[0])
    quiet.setLevel(levels[1])


def configure(out: io.StringIO, level: str, fmt: str, worker: str = "main") -> None:
    logs.configure(level, fmt, worker=worker, stream=out)


def test_text_line_has_time_level_worker_and_logger(stderr: io.StringIO) -> None:
    configure(stderr, "info", "text", "Sanic-Server-1-0")
    logging.getLogger("routeyard.reload").info("config reloaded: %s", "sha")
    logging.getLogger("sanic.server").warning("\033[1mStarting worker\033[0m [42]")
    logging.getLogger("routeyard").debug("not at INFO")
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert all(TEXT_LINE.match(line) for line in lines), lines
    assert lines[0].endswith(" INFO Sanic-Server-1-0 routeyard.reload: config reloaded: sha")
    assert lines[1].endswith(" WARNING Sanic-Server-1-0 sanic.server: Starting worker [42]")


def test_json_line_has_the_fields_and_the_extras(stderr: io.StringIO) -> None:
    configure(stderr, "DEBUG", "json", "main")
    logging.getLogger("routeyard").debug("%d models", 3, extra={"models": 3, "auth": "off"})
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("sanic.error").exception("failed")
    first, second = (orjson.loads(line) for line in stderr.getvalue().splitlines())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first.pop("time"))
    assert isinstance(first.pop("pid"), int)
    assert first == {"level": "DEBUG", "logger": "routeyard", "worker": "main",
                     "message": "3 models", "models": 3, "auth": "off"}
    assert second["level"] == "ERROR" and second["message"] == "failed"
    assert "ValueError: boom" in second["exception"]


def test_configure_replaces_only_its_own_handler(stderr: io.StringIO) -> None:
    other = logging.StreamHandler(io.StringIO())
    logging.getLogger().addHandler(other)
    try:
        configure(stderr, "INFO", "text", "main")
        configure(stderr, "WARNING", "json", "main")
        ours = [h for h in logging.getLogger().handlers if isinstance(h, logs._Handler)]
        assert len(ours) == 1 and other in logging.getLogger().handlers
        assert logging.getLogger().level == logging.WARNING
        logging.getLogger("routeyard").info("hidden")
        logging.getLogger("routeyard").warning("shown")
        [line] = stderr.getvalue().splitlines()
        assert orjson.loads(line)["message"] == "shown"
    finally:
        logging.getLogger().removeHandler(other)


def test_watchfiles_stays_at_warning_unless_debug(stderr: io.StringIO) -> None:
    configure(stderr, "INFO", "text", "main")
    assert logging.getLogger("watchfiles").getEffectiveLevel() == logging.WARNING
    configure(stderr, "DEBUG", "text", "main")
    assert logging.getLogger("watchfiles").getEffectiveLevel() == logging.DEBUG


def test_worker_name_and_who_leads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANIC_WORKER_NAME", raising=False)
    assert logs.worker_name() == "main"
    monkeypatch.setenv("SANIC_WORKER_NAME", "Sanic-Server-1-0")
    assert logs.worker_name() == "Sanic-Server-1-0"
    assert logs.leads("main") and logs.leads("Sanic-Server-0-0") and logs.leads("Sanic-Server-0-3")
    assert not logs.leads("Sanic-Server-1-0") and not logs.leads("Sanic-Server-10-0")


def test_log_level_and_format_accept_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTEYARD_LOG_LEVEL", "debug")
    monkeypatch.setenv("ROUTEYARD_LOG_FORMAT", "JSON")
    settings = Settings()
    assert (settings.log_level, settings.log_format) == ("DEBUG", "json")


@pytest.mark.parametrize(("variable", "value", "accepted"), [
    ("ROUTEYARD_PORT", "abc", "valid integer"),
    ("ROUTEYARD_PORT", "70000", "less than or equal to 65535"),
    ("ROUTEYARD_PORT", "-1", "greater than or equal to 0"),
    ("ROUTEYARD_WORKERS", "0", "greater than or equal to 1"),
    ("ROUTEYARD_LOG_LEVEL", "verbose", "'DEBUG', 'INFO', 'WARNING', 'ERROR' or 'CRITICAL'"),
    ("ROUTEYARD_LOG_FORMAT", "xml", "'text' or 'json'"),
])
def test_a_refused_setting_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch,
                                                 variable: str, value: str,
                                                 accepted: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as caught:
        Settings()
    line = describe(caught.value)
    assert "\n" not in line
    assert line.startswith(f"{variable}=") and value.lower() in line.lower()
    assert accepted in line


def test_a_refused_flag_is_named_as_the_flag() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(workers=0)
    assert describe(caught.value, {"workers": "--workers"}).startswith("--workers 0: ")
