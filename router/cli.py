"""The ``routeyard`` command: serve, check, fake-engine, demo, compat."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from functools import partial

from router.config import ConfigError, RoutesConfig, load_file
from router.settings import Settings

DEMO_ENGINES = (
    # (public model name, fake-engine task, port offset, endpoint groups)
    ("demo-chat", "generate", 1, "[chat, completions, responses, messages, tokenize]"),
    ("demo-embed", "embed", 2, "[embeddings, pooling, tokenize]"),
    ("demo-rerank", "score", 3, "[rerank, score, classify, pooling, tokenize]"),
    ("demo-whisper", "transcription", 4, "[transcription, translation]"),
)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["hash-key"]:
        from router.tenants.cli import hash_key_command

        return hash_key_command(argv[1:])
    parser = argparse.ArgumentParser(prog="routeyard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("hash-key", help="print a new API key and the hash for routes.yaml")
    worker = sub.add_parser("batch-worker",
                            help="run batch workers only (the batch: block of the routes file)")
    worker.add_argument("--config", help="routes file (env ROUTEYARD_CONFIG)")

    serve = sub.add_parser("serve", help="run the router")
    serve.add_argument("--config", help="routes file (env ROUTEYARD_CONFIG)")
    serve.add_argument("--host", help="listen address (env ROUTEYARD_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (env ROUTEYARD_PORT, default 8080)")
    serve.add_argument("--workers", type=int, help="worker processes (env ROUTEYARD_WORKERS)")

    check = sub.add_parser("check", help="validate a routes file without serving")
    check.add_argument("file")
    check.add_argument("--no-secrets", action="store_true",
                       help="validate the file alone: do not read the key files and "
                            "environment variables it names (auth:, api_key_env), for a "
                            "file whose secrets exist only where it is deployed")

    fake = sub.add_parser("fake-engine", help="run a fake vLLM engine for tests and demos")
    fake.add_argument("--model", action="append", required=True, help="served model name")
    fake.add_argument("--task", required=True,
                      choices=["generate", "embed", "score", "transcription"])
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, required=True)
    fake.add_argument("--latency-ms", type=float, default=0.0)
    fake.add_argument("--token-delay-ms", type=float, default=0.0)
    fake.add_argument("--tokens", type=int, default=8)

    demo = sub.add_parser("demo", help="fake engines plus the router on a built-in config")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--engine-base-port", type=int, default=8100)

    compat = sub.add_parser(
        "compat", help="send the same requests to an engine and through a router; diff them")
    compat.add_argument("--engine", required=True, help="engine base URL (vLLM)")
    compat.add_argument("--router", required=True, help="router (or gateway) base URL")
    compat.add_argument("--model", required=True, help="the model's name at the router")
    compat.add_argument("--engine-model", help="the engine's served name (default: --model)")
    compat.add_argument("--task", required=True,
                        choices=["generate", "embed", "score", "transcription"])
    compat.add_argument("--groups", help="only these endpoint groups, comma-separated")
    compat.add_argument("--markdown", metavar="FILE", help="also write the report as Markdown")
    compat.add_argument("--engine-header", action="append", default=[], metavar="'NAME: VALUE'",
                        help="extra header for the engine (repeatable), e.g. authorization")
    compat.add_argument("--router-header", action="append", default=[], metavar="'NAME: VALUE'",
                        help="extra header for the router (repeatable)")
    compat.add_argument("--timeout", type=float, default=120.0, help="seconds per request")

    args = parser.parse_args(argv)
    if args.command == "batch-worker":
        settings = Settings(**({"config": args.config} if args.config else {}))
        _setup_logging(settings.log_level)
        return asyncio.run(batch_worker(settings.config))
    if args.command == "compat":
        return compat_command(args)
    if args.command == "serve":
        overrides = {k: v for k in ("config", "host", "port", "workers")
                     if (v := getattr(args, k)) is not None}
        return serve_command(Settings(**overrides))
    if args.command == "check":
        return check_command(args.file, secrets=not args.no_secrets)
    if args.command == "fake-engine":
        from router.fake_engine.app import run

        run(args.model, args.task, args.host, args.port, latency_ms=args.latency_ms,
            token_delay_ms=args.token_delay_ms, tokens=args.tokens)
        return 0
    return demo_command(args.host, args.port, args.engine_base_port)


async def batch_worker(config_path: str) -> int:
    """A process that only runs batches, through its own routing core (same routes file:
    allowlists, balancing, health and retries), until SIGTERM."""
    from router.batch.worker import run_worker
    from router.dispatch import RouterDispatcher
    from router.health import HealthChecker
    from router.proxy import Proxy
    from router.reload import ConfigHolder
    from router.stored_responses import ResponseIds
    from router.tenants.limits import build_limiter

    holder = ConfigHolder(config_path)
    try:
        await holder.load()
    except ConfigError as exc:
        print(f"routeyard: {exc}", file=sys.stderr)
        return 1
    batch = holder.current.config.batch
    if batch is None:
        print(f"routeyard: {config_path} has no `batch:` block", file=sys.stderr)
        return 1
    checker = HealthChecker(holder.registry.board, holder.registry.by_key.values,
                            holder.health_settings)
    proxy = Proxy(holder, ResponseIds())
    proxy.start(build_limiter(), [], None)
    tasks = [asyncio.create_task(t) for t in (holder.watch(), checker.run(),
                                              holder.refresh_dns())]
    try:
        await run_worker(batch, RouterDispatcher(proxy))
    finally:
        for task in tasks:
            task.cancel()
        checker.close()
        await proxy.limiter.close()
        holder.close()
    return 0


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


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def serve_command(settings: Settings) -> int:
    from sanic import Sanic
    from sanic.worker.loader import AppLoader

    from router import tracing
    from router.app import create_app
    from router.listener import Listener

    _setup_logging(settings.log_level)
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
    metrics_dir = _metrics_dir(settings)
    _warn_unshared_limits(config, settings.workers)
    logging.getLogger("routeyard").info(
        "serving %d models from %s on %s:%d with %d worker(s)",
        len(config.models), settings.config, settings.host, settings.port, settings.workers,
    )
    loader = AppLoader(factory=partial(create_app, settings))
    app = loader.load()
    app.prepare(
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        single_process=settings.workers == 1,
        protocol=Listener,  # strict framing, deadlines, the connection limit, auth first
        access_log=False,
        motd=False,
    )
    try:
        if settings.workers == 1:
            # One process that owns the listening socket: SIGTERM closes it at once, so
            # new connections are refused while streams in flight finish.
            Sanic.serve_single(primary=app)
        else:
            Sanic.serve(primary=app, app_loader=loader)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _warn_unshared_limits(config: RoutesConfig, workers: int) -> None:
    """Rate limits without Redis are kept in each worker: say so where operators look."""
    if workers <= 1 or os.environ.get("ROUTEYARD_REDIS_URL") or config.auth is None:
        return
    # model_limits is resolved into (pattern, Limits) pairs, not a dict.
    limited = [k.id for k in config.auth.keys
               if k.limits.rpm or k.limits.tpm or any(lim.rpm or lim.tpm
                                                      for _pattern, lim in k.model_limits)]
    if limited:
        logging.getLogger("routeyard").warning(
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
    logging.getLogger("routeyard").info(
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
    """Start four fake engines and the router in front of them, until Ctrl-C."""
    engines = []
    try:
        for name, task, offset, _groups in DEMO_ENGINES:
            engines.append(subprocess.Popen([
                sys.executable, "-m", "router.cli", "fake-engine", "--model", name,
                "--task", task, "--host", "127.0.0.1", "--port", str(base_port + offset),
                "--token-delay-ms", "20",
            ]))
        for _name, _task, offset, _groups in DEMO_ENGINES:
            _wait_healthy(f"http://127.0.0.1:{base_port + offset}/health", 30)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(demo_routes(base_port))
        print(f"routeyard demo: router on http://{host}:{port}/v1 (routes file {f.name})\n"
              f"  models: {', '.join([e[0] for e in DEMO_ENGINES] + ['demo-score'])}\n"
              f"  try: curl http://{host}:{port}/v1/chat/completions -H 'content-type: "
              f"application/json' -d '{{\"model\":\"demo-chat\",\"messages\":"
              f"[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'", flush=True)
        return serve_command(Settings(config=f.name, host=host, port=port, workers=1))
    except KeyboardInterrupt:
        return 0
    finally:
        for proc in engines:
            proc.terminate()
        for proc in engines:
            proc.wait(10)


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
