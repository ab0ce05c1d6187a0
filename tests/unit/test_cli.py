"""The ``routeyard`` command line in-process: ``--version``, help text for every
subcommand and option (with its default), and ``serve``'s start summary line."""

from __future__ import annotations

import argparse
import importlib.metadata

import pytest

from router.cli import build_parser, main, start_summary
from router.config import parse
from router.settings import Settings
from router.tenants.config import hash_key

COMMANDS = {"serve", "check", "demo", "fake-engine", "compat", "hash-key", "batch-worker"}


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"routeyard {importlib.metadata.version('routeyard')}\n"


def test_top_level_help_lists_every_command() -> None:
    parser = build_parser()
    assert set(subparsers(parser)) == COMMANDS
    text = parser.format_help()
    for name in COMMANDS:
        assert f"    {name}" in text, name


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_has_help_with_its_default(name: str) -> None:
    parser = subparsers(build_parser())[name]
    text = " ".join(parser.format_help().split())  # as wrapped at any terminal width
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        if action.default not in (None, [], argparse.SUPPRESS):
            assert f"(default: {action.default})" in text, (name, action.dest)
    assert parser.description, name


def test_serve_help_names_each_variable_and_its_default() -> None:
    text = " ".join(subparsers(build_parser())["serve"].format_help().split())
    for flag, variable in (("config", "CONFIG"), ("host", "HOST"), ("port", "PORT"),
                           ("workers", "WORKERS")):
        default = Settings.model_fields[flag].default
        assert f"env ROUTEYARD_{variable}, default {default}" in text


def test_batch_worker_help_names_each_variable_and_its_default() -> None:
    text = " ".join(subparsers(build_parser())["batch-worker"].format_help().split())
    assert "--metrics-port" in text and "--metrics-host" in text
    assert "env ROUTEYARD_BATCH_WORKER_METRICS_PORT, default none: no metrics port" in text
    assert f"env ROUTEYARD_HOST, default {Settings.model_fields['host'].default}" in text
    assert Settings.model_fields["batch_worker_metrics_port"].default is None


@pytest.mark.parametrize(("args", "line"), [
    (["--metrics-port", "65536"], "--metrics-port 65536: Input should be less than or equal "
                                  "to 65535"),
    (["--metrics-port", "-1"], "--metrics-port -1: Input should be greater than or equal to 0"),
])
def test_batch_worker_refuses_a_bad_metrics_port_naming_the_flag(
        args: list[str], line: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["batch-worker", *args]) == 2
    assert capsys.readouterr().err == f"routeyard: {line}\n"


def test_batch_worker_refuses_a_bad_metrics_port_setting_naming_the_variable(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ROUTEYARD_BATCH_WORKER_METRICS_PORT", "http")
    assert main(["batch-worker"]) == 2
    assert capsys.readouterr().err.startswith(
        "routeyard: ROUTEYARD_BATCH_WORKER_METRICS_PORT='http': Input should be a valid integer")


MODELS = """\
models:
  a:
    backends: [{url: "http://127.0.0.1:9"}, {url: "http://127.0.0.1:10"}]
    endpoints: [chat]
  b:
    backends: [{url: "http://127.0.0.1:11"}]
    endpoints: [embeddings]
"""


def test_start_summary_says_what_runs() -> None:
    config = parse(MODELS.encode())
    message, fields = start_summary(config, Settings(workers=3, access_log=True), {})
    version = importlib.metadata.version("routeyard")
    assert message == (f"routeyard {version}: 2 models, 3 backends from routes.yaml; auth off; "
                       "batch off; tracing off; metrics on; access log on; 3 worker(s)")
    assert fields == {"version": version, "models": 2, "backends": 3, "auth": "off",
                      "batch": "off", "tracing": "off", "metrics": "on", "access_log": "on",
                      "workers": 3}


def test_start_summary_names_kinds_and_never_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROUTEYARD_BATCH_DATABASE_URL", raising=False)
    text = MODELS + (
        "auth:\n  keys:\n"
        f"    - {{id: k1, hash: {hash_key('ry-one-' + 'a' * 40)}, models: ['*']}}\n"
        f"    - {{id: k2, hash: {hash_key('ry-two-' + 'b' * 40)}, models: ['*']}}\n"
        "batch:\n"
        "  database_url: postgresql+asyncpg://router:s3cret-pw@db.example:5432/batches\n"
        "  storage: {url: 's3://bucket/prefix', access_key_id: AKIDEXAMPLE,"
        " secret_access_key: hush-hush}\n")
    config = parse(text.encode())
    env = {"OTEL_TRACES_EXPORTER": "otlp,console"}
    message, fields = start_summary(config, Settings(metrics=False), env)
    assert "auth on (2 keys)" in message
    assert "batch on (database postgresql, storage s3)" in message
    assert "tracing otlp,console" in message and "metrics off" in message
    for secret in ("s3cret-pw", "router", "db.example", "hush-hush", "AKIDEXAMPLE", "bucket"):
        assert secret not in message and secret not in str(fields), secret
    local = parse((MODELS + "batch: {database_url: 'sqlite+aiosqlite:///b.db'}\n").encode())
    assert "batch on (database sqlite, storage local)" in start_summary(
        local, Settings(), {})[0]
