"""The ``routeyard`` command: serve, check, demo, fake-engine, compat, hash-key, batch-worker."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from router import logs
from router.config import ConfigError, RoutesConfig, load_file
from router.settings import Settings, describe

if TYPE_CHECKING:
    from router.metrics import Metrics
    from router.snapshot import Snapshot

log = logging.getLogger("routeyard")
#: Sanic's listen backlog (``bind_socket``'s default is the same).
BACKLOG = 100
#: ``serve``'s flags, by the setting each overrides.
SERVE_FLAGS = {"config": "--config", "host": "--host", "port": "--port", "workers": "--workers"}
#: ``batch-worker``'s flags, by the setting each overrides.
BATCH_WORKER_FLAGS = {"config": "--config", "host": "--metrics-host",
                      "batch_worker_metrics_port": "--metrics-port"}

DEMO_ENGINES = (
    # (public model name, fake-engine task, port offset, endpoint groups)
    ("demo-chat", "generate", 1, "[chat, completions, responses, messages, tokenize]"),
    ("demo-embed", "embed", 2, "[embeddings, pooling, tokenize]"),
    ("demo-rerank", "score", 3, "[rerank, score, classify, pooling, tokenize]"),
    ("demo-whisper", "transcription", 4, "[transcription, translation]"),
)


def version() -> str:
    """The installed distribution's version (``pip install`` wrote it)."""
    try:
        return importlib.metadata.version("routeyard")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Adds ``(default: …)`` to an option's help, except where there is none to show (the
    help names the variable and its default itself)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, [], argparse.SUPPRESS) or action.required:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="routeyard", formatter_class=_Help,
        description="A YAML-driven router for OpenAI-compatible LLM serving (vLLM).")
    parser.add_argument("--version", action="version", version=f"routeyard {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=_Help)

    defaults = Settings.model_fields
    serve = command("serve", "run the router")
    serve.epilog = ("Every other setting is a ROUTEYARD_* environment variable "
                    "(docs/configuration.md); a value it does not accept exits with status 2.")
    serve.add_argument("--config", help="routes file (env ROUTEYARD_CONFIG, default "
                       f"{defaults['config'].default})")
    serve.add_argument("--host", help="listen address (env ROUTEYARD_HOST, default "
                       f"{defaults['host'].default})")
    serve.add_argument("--port", type=int, help="listen port (env ROUTEYARD_PORT, default "
                       f"{defaults['port'].default})")
    serve.add_argument("--workers", type=int, help="worker processes (env ROUTEYARD_WORKERS, "
                       f"default {defaults['workers'].default})")

    check = command("check", "validate a routes file without serving; one line per model")
    check.add_argument("file", help="the routes file (routes.yaml)")
    check.add_argument("--no-secrets", action="store_true",
                       help="validate the file alone: do not read the key files and "
                            "environment variables it names (auth:, api_key_env), for a "
                            "file whose secrets exist only where it is deployed")

    demo = command("demo", "fake engines plus the router on a built-in config, until Ctrl-C")
    demo.add_argument("--host", default="127.0.0.1", help="the router's listen address")
    demo.add_argument("--port", type=int, default=8080, help="the router's listen port")
    demo.add_argument("--engine-base-port", type=int, default=8100,
                      help="the fake engines listen on the next four ports after this one")

    fake = command("fake-engine", "run a fake vLLM engine for tests and demos")
    fake.add_argument("--model", action="append", required=True,
                      help="served model name (repeatable; at least one)")
    fake.add_argument("--task", required=True, help="what the engine serves",
                      choices=["generate", "embed", "score", "transcription"])
    fake.add_argument("--host", default="127.0.0.1", help="listen address")
    fake.add_argument("--port", type=int, required=True, help="listen port")
    fake.add_argument("--latency-ms", type=float, default=0.0,
                      help="delay before each response's headers, in milliseconds")
    fake.add_argument("--token-delay-ms", type=float, default=0.0,
                      help="delay between streamed tokens, in milliseconds")
    fake.add_argument("--tokens", type=int, default=8, help="tokens a generation produces")
    fake.add_argument("--lora", action="append", default=[],
                      help="a LoRA adapter of the first model, loaded at start and listed in "
                      "/v1/models with its parent (repeatable; /_fake/load_lora adds more)")

    compat = command("compat", "send the same requests to an engine and through a router; "
                     "diff them")
    compat.add_argument("--engine", required=True, help="engine base URL (vLLM)")
    compat.add_argument("--router", required=True, help="router (or gateway) base URL")
    compat.add_argument("--model", required=True, help="the model's name at the router")
    compat.add_argument("--engine-model", help="the engine's served name (default: --model)")
    compat.add_argument("--task", required=True, help="what the engine serves",
                        choices=["generate", "embed", "score", "transcription"])
    compat.add_argument("--groups", help="only these endpoint groups, comma-separated "
                        "(default: every group of the task)")
    compat.add_argument("--markdown", metavar="FILE", help="also write the report as Markdown")
    compat.add_argument("--engine-header", action="append", default=[], metavar="'NAME: VALUE'",
                        help="extra header for the engine (repeatable), e.g. authorization")
    compat.add_argument("--router-header", action="append", default=[], metavar="'NAME: VALUE'",
                        help="extra header for the router (repeatable)")
    compat.add_argument("--timeout", type=float, default=120.0, help="seconds per request")

    command("hash-key", "print a new API key and the hash for routes.yaml "
            "(`routeyard hash-key --help` for its options)")
    worker = command("batch-worker", "run batch workers only (the batch: block of the routes "
                     "file), until SIGTERM")
    worker.add_argument("--config", help="routes file (env ROUTEYARD_CONFIG, default "
                        f"{defaults['config'].default})")
    worker.add_argument("--metrics-port", type=int, dest="batch_worker_metrics_port",
                        metavar="PORT",
                        help="serve Prometheus metrics on GET /metrics at this port, no auth "
                             "(env ROUTEYARD_BATCH_WORKER_METRICS_PORT, default none: no "
                             "metrics port; 0: a free port, logged)")
    worker.add_argument("--metrics-host", dest="host", metavar="HOST",
                        help="listen address of the metrics port (env ROUTEYARD_HOST, default "
                             f"{defaults['host'].default}; 0.0.0.0 in containers)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["hash-key"]:
        from router.tenants.cli import hash_key_command

        return hash_key_command(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command in ("serve", "batch-worker"):
        flags = SERVE_FLAGS if args.command == "serve" else BATCH_WORKER_FLAGS
        given = {k: v for k in flags if (v := getattr(args, k, None)) is not None}
        try:
            settings = Settings(**given)
        except ValidationError as exc:
            print(f"routeyard: {describe(exc, {k: flags[k] for k in given})}",
                  file=sys.stderr)
            return 2
        if args.command == "serve":
            return serve_command(settings)
        logs.configure(settings.log_level, settings.log_format)
        return asyncio.run(batch_worker(settings))
    if args.command == "compat":
        return compat_command(args)
    if args.command == "check":
        return check_command(args.file, secrets=not args.no_secrets)
    if args.command == "fake-engine":
        from router.fake_engine.app import run

        run(args.model, args.task, args.host, args.port, latency_ms=args.latency_ms,
            token_delay_ms=args.token_delay_ms, tokens=args.tokens, loras=args.lora)
        return 0
    return demo_command(args.host, args.port, args.engine_base_port)


async def batch_worker(settings: Settings) -> int:
    """A process that only runs batches, through its own routing core (same routes file:
    allowlists, balancing, health and retries), until SIGTERM; with a metrics port, its
    lines are counted and served there (the database's batch gauges are the routers')."""
    from router.batch.worker import run_worker
    from router.dispatch import RouterDispatcher
    from router.health import HealthChecker
    from router.proxy import Proxy
    from router.reload import ConfigHolder
    from router.stored_responses import ResponseIds
    from router.tenants.limits import build_limiter

    holder = ConfigHolder(settings.config)
    port = settings.batch_worker_metrics_port
    metrics = None if port is None else _single_process_metrics()
    if metrics is not None:
        holder.listeners.append(partial(_config_loaded, metrics))
    try:
        await holder.load()
    except ConfigError as exc:
        print(f"routeyard: {exc}", file=sys.stderr)
        return 1
    batch = holder.current.config.batch
    if batch is None:
        print(f"routeyard: {settings.config} has no `batch:` block", file=sys.stderr)
        return 1
    server = None
    if metrics is not None:
        assert port is not None
        try:
            server = metrics.serve(settings.host, port)
        except OSError as exc:
            print(f"routeyard: cannot listen on {_location(settings.host, port)}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            holder.close()
            return 1
        log.info("metrics on http://%s/metrics",
                 _location(settings.host, server.server_address[1]))
        metrics.start(asyncio.get_running_loop(), holder.sampled)
    checker = HealthChecker(holder.registry.board, holder.registry.by_key.values,
                            holder.health_settings)
    proxy = Proxy(holder, ResponseIds())
    proxy.start(build_limiter(), [] if metrics is None else [metrics], None)
    tasks = [asyncio.create_task(t) for t in (holder.watch(), checker.run(),
                                              holder.refresh_dns())]
    try:
        await run_worker(batch, RouterDispatcher(proxy),
                         started=None if metrics is None else metrics.watch_lines)
    finally:
        for task in tasks:
            task.cancel()
        checker.close()
        await proxy.limiter.close()
        if metrics is not None:
            metrics.close()  # the last flush, while the endpoints are still there
        if server is not None:
            server.shutdown()
            server.server_close()
        holder.close()
    return 0


def _single_process_metrics() -> Metrics:
    """The batch worker's metrics: one process, so never ``PROMETHEUS_MULTIPROC_DIR``
    (an environment shared with ``routeyard serve`` may set it); removed before
    ``prometheus_client`` is imported, which is when it picks its storage."""
    from router.metrics import MULTIPROC_ENV, Metrics

    if os.environ.pop(MULTIPROC_ENV, None) is not None:
        log.info("metrics: %s is ignored by batch-worker (one process)", MULTIPROC_ENV)
    return Metrics(batch_database=False)


def _config_loaded(metrics: Metrics, result: str | None, snap: Snapshot) -> None:
    metrics.config_loaded(result, snap.config.sha256)


def compat_command(args: argparse.Namespace) -> int:
    from router.compat.runner import parse_header, run

    try:
        engine_headers = dict(parse_header(h) for h in args.engine_header)
        router_headers = dict(parse_header(h) for h in args.router_header)
        groups = [g.strip() for g in args.groups.split(",") if g.strip()] if args.groups else None
        return run(args.engine, args.router, args.model, args.task,
                   engine_model=args.engine_model, groups=groups, markdown=args.markdown,
                   engine_headers=engine_headers, router_headers=router_headers,
                   timeout=args.timeout)
    except ValueError as exc:
        print(f"routeyard compat: {exc}", file=sys.stderr)
        return 2


def serve_command(settings: Settings) -> int:
    from sanic import Sanic
    from sanic.worker.loader import AppLoader

    from router import tracing
    from router.app import create_app
    from router.listener import Listener

    logs.configure(settings.log_level, settings.log_format)
    try:
        config = load_file(settings.config)
    except ConfigError as exc:
        print(f"routeyard: {exc}", file=sys.stderr)
        return 1
    try:
        tracing.check(os.environ, settings.tracing)
    except ValueError as exc:
        print(f"routeyard: {exc}", file=sys.stderr)
        return 1
    try:
        sock = bind(settings.host, settings.port)
    except OSError as exc:
        print(f"routeyard: cannot listen on {_location(settings.host, settings.port)}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    location = _location(settings.host, sock.getsockname()[1])
    metrics_dir = None
    try:
        _warn_unshared_limits(config, settings.workers)
        message, fields = start_summary(config, settings, os.environ)
        log.info("%s", message, extra=fields)
        metrics_dir = _metrics_dir(settings)
        loader = AppLoader(factory=partial(create_app, settings))
        app = loader.load()
        app.prepare(
            host=settings.host,
            port=settings.port,
            sock=sock,  # bound above: a busy port is one line, and "serving" follows the bind
            backlog=BACKLOG,
            workers=settings.workers,
            single_process=settings.workers == 1,
            protocol=Listener,  # strict framing, deadlines, the connection limit, auth first
            access_log=False,
            motd=False,
        )
        serving = f"serving on http://{location} with {settings.workers} worker(s)"
        if settings.workers == 1:
            # One process that owns the listening socket: SIGTERM closes it at once, so
            # new connections are refused while streams in flight finish.
            app.before_server_start(_hold_stop_signals, priority=-1_000_000)  # the last
            app.after_server_start(partial(_stop_signals_handled, serving))
            for sig in STOP_SIGNALS:  # while starting: stop at once (a Ctrl-C, a SIGTERM)
                signal.signal(sig, signal.default_int_handler)
            logging.getLogger("sanic.error").addFilter(_not_a_stop)
            try:
                Sanic.serve_single(primary=app)
            except KeyboardInterrupt:
                log.info("stopped while starting")
        else:
            log.info("%s", serving)
            Sanic.serve(primary=app, app_loader=loader)
    finally:
        sock.close()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


async def _hold_stop_signals(_app: Any) -> None:
    """Sanic's single process serves before it handles SIGINT and SIGTERM (its handlers
    come once the socket is served): a Ctrl-C in between was a KeyboardInterrupt
    traceback, or was lost. Until then a stop signal interrupts the start (the listeners
    before this one: the config, DNS, the batch database); from here, the last of them,
    until Sanic's handlers are in, it is noted, and ``_stop_signals_handled`` stops the
    server as Sanic's handler would."""
    _EARLY_STOP.clear()
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, _frame: _EARLY_STOP.append(signum))


def _not_a_stop(record: logging.LogRecord) -> bool:
    """Sanic logs a stop signal while starting (a KeyboardInterrupt) as an error with a
    traceback: it is a stop, logged as one by ``serve_command``."""
    return not (record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt))


#: The stop signals that came before Sanic handled them (``_hold_stop_signals``).
_EARLY_STOP: list[int] = []


async def _stop_signals_handled(serving: str, app: Any) -> None:
    """Sanic handles the stop signals now: the server is up, and says so."""
    log.info("%s", serving)
    if _EARLY_STOP:
        app.loop.call_soon(partial(app.stop, terminate=False))


def _location(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound and listening (``OSError`` when it cannot be)."""
    from sanic.server.socket import bind_socket

    return bind_socket(host, port, backlog=BACKLOG)


def start_summary(config: RoutesConfig, settings: Settings,
                  env: Mapping[str, str]) -> tuple[str, dict[str, Any]]:
    """The start line: what this router runs with (no secret: kinds, not URLs), and the
    same as fields for ``ROUTEYARD_LOG_FORMAT=json``."""
    from router.tracing import exporter_names, tracing_wanted

    backends = sum(len(m.backends) for m in config.models.values())
    auth = f"on ({len(config.auth.keys)} keys)" if config.auth is not None else "off"
    batch = "off"
    if config.batch is not None:
        database = config.batch.database_url.split(":", 1)[0].split("+", 1)[0]
        url = config.batch.storage.url
        storage = url.split("://", 1)[0] if "://" in url and not url.startswith("file:") else (
            "local")
        batch = f"on (database {database}, storage {storage})"
    tracing = ",".join(exporter_names(env)) or "none" if tracing_wanted(
        env, settings.tracing) else "off"
    fields: dict[str, Any] = {
        "version": version(), "models": len(config.models), "backends": backends,
        "auth": auth, "batch": batch, "tracing": tracing,
        "metrics": "on" if settings.metrics else "off",
        "access_log": "on" if settings.access_log else "off", "workers": settings.workers,
    }
    message = (f"routeyard {fields['version']}: {fields['models']} models, {backends} backends "
               f"from {settings.config}; auth {auth}; batch {batch}; tracing {tracing}; "
               f"metrics {fields['metrics']}; access log {fields['access_log']}; "
               f"{settings.workers} worker(s)")
    return message, fields


def _warn_unshared_limits(config: RoutesConfig, workers: int) -> None:
    """Rate limits without Redis are kept in each worker: say so where operators look."""
    if workers <= 1 or os.environ.get("ROUTEYARD_REDIS_URL") or config.auth is None:
        return
    # model_limits is resolved into (pattern, Limits) pairs, not a dict.
    limited = [k.id for k in config.auth.keys
               if k.limits.rpm or k.limits.tpm or any(lim.rpm or lim.tpm
                                                      for _pattern, lim in k.model_limits)]
    if limited:
        log.warning(
            "rate limits of %d key(s) (%s) are kept per worker: with %d workers a key may "
            "get up to %dx its rpm/tpm; set ROUTEYARD_REDIS_URL to share them "
            "(docs/security.md)", len(limited), ", ".join(limited[:5]), workers, workers)


def _metrics_dir(settings: Settings) -> str | None:
    """Set up ``PROMETHEUS_MULTIPROC_DIR`` before any worker starts (workers inherit it).

    With several workers and none given, a fresh directory is made for this run (and
    removed at exit: returned). A given directory is emptied of an earlier run's files."""
    from router.metrics import MULTIPROC_ENV, prepare_multiprocess_dir

    if not settings.metrics:
        return None
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        prepare_multiprocess_dir(given)
        return None
    if settings.workers <= 1:
        return None
    path = tempfile.mkdtemp(prefix="routeyard-metrics-")
    os.environ[MULTIPROC_ENV] = path
    log.info(
        "metrics: %d workers share %s=%s (removed at exit)", settings.workers, MULTIPROC_ENV,
        path)
    return path


def check_command(path: str, *, secrets: bool = True) -> int:
    try:
        config = load_file(path, secrets=secrets)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not secrets:
        print("note: key files and environment variables were not read (--no-secrets)")
    for name, model in config.models.items():
        backends = ", ".join(b.url for b in model.backends)
        rename = f" (backend name {model.backend_model})" if model.backend_model else ""
        print(f"{name}{rename}: {len(model.backends)} backend(s) [{backends}]; "
              f"endpoints: {', '.join(sorted(model.endpoints))}")
    print(f"ok: {len(config.models)} model(s), sha256 {config.sha256[:12]}")
    return 0


def demo_routes(base_port: int) -> str:
    lines = ["models:"]
    for name, _task, offset, groups in DEMO_ENGINES:
        url = f"http://127.0.0.1:{base_port + offset}"
        lines += [f"  {name}:", "    backends:", f"      - url: {url}", f"    endpoints: {groups}"]
    # A public name served by the engine under another name (the model is rewritten).
    lines += ["  demo-score:", "    backends:", f"      - url: http://127.0.0.1:{base_port + 3}",
              "    backend_model: demo-rerank", "    endpoints: [score]"]
    return "\n".join(lines) + "\n"


def demo_command(host: str, port: int, base_port: int) -> int:
    """Start four fake engines and the router in front of them, until Ctrl-C (or SIGTERM);
    the temporary routes file is removed at exit."""
    try:
        settings = Settings(host=host, port=port, workers=1)
    except ValidationError as exc:
        print(f"routeyard demo: {describe(exc, {'host': '--host', 'port': '--port'})}",
              file=sys.stderr)
        return 2
    ports = [(host, port)] + [("127.0.0.1", base_port + e[2]) for e in DEMO_ENGINES]
    for where in ports:
        try:
            bind(*where).close()
        except OSError as exc:
            print(f"routeyard demo: cannot listen on {_location(*where)}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            return 1
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # cleanup runs
    engines = []
    fd, routes = tempfile.mkstemp(prefix="routeyard-demo-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(demo_routes(base_port))
        for name, task, offset, _groups in DEMO_ENGINES:
            engines.append(subprocess.Popen([
                sys.executable, "-m", "router.cli", "fake-engine", "--model", name,
                "--task", task, "--host", "127.0.0.1", "--port", str(base_port + offset),
                "--token-delay-ms", "20",
            ]))
        for _name, _task, offset, _groups in DEMO_ENGINES:
            _wait_healthy(f"http://127.0.0.1:{base_port + offset}/health", 30)
        print(f"routeyard demo: router on http://{host}:{port}/v1 (routes file {routes})\n"
              f"  models: {', '.join([e[0] for e in DEMO_ENGINES] + ['demo-score'])}\n"
              f"  try: curl http://{host}:{port}/v1/chat/completions -H 'content-type: "
              f"application/json' -d '{{\"model\":\"demo-chat\",\"messages\":"
              f"[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'", flush=True)
        return serve_command(settings.model_copy(update={"config": routes}))
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        for proc in engines:
            proc.terminate()
        for proc in engines:
            proc.wait(10)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(routes)


def _wait_healthy(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"routeyard demo: {url} did not become healthy") from None
            time.sleep(0.1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
