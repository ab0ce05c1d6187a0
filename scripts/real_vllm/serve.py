"""Start real vLLM servers (CPU build) for the tiny models, on loopback, and wait for health.

    python scripts/real_vllm/serve.py [--kinds chat,embed,cross,whisper] [--log-dir DIR]

It builds the models first (``build_models.py``, cached), starts one ``vllm serve`` per
model kind with the flags of ``command`` (vLLM's CPU backend: float32, eager mode, one
process, a fixed KV cache size; see
https://docs.vllm.ai/en/latest/getting_started/installation/cpu.html), prints one JSON line
(kind → url and served names) once every ``/health`` answers 200, and stops the servers
on Ctrl-C or SIGTERM. The test tier imports ``start`` and ``stop`` from this file.

Needs the venv of ``install.sh`` (``$VLLM_VENV``, default ``<repo>/.venv-vllm``); this
script itself uses only the standard library, so any Python 3.11 can run it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Spec:
    """How to serve one model kind: its served names and extra ``vllm serve`` flags."""

    kind: str
    names: tuple[str, ...]
    flags: tuple[str, ...] = ()
    kv_cache_bytes: int = 64 * MiB
    #: Environment variables of this server on top of ``ENV`` (name, value).
    env: tuple[tuple[str, str], ...] = ()


SPECS: dict[str, Spec] = {
    "chat": Spec("chat", ("tiny-qwen2",), (
        "--max-model-len", "2048",
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
        "--structured-outputs-config",
        '{"backend":"xgrammar","disable_any_whitespace":true}',
    ), kv_cache_bytes=256 * MiB),
    "embed": Spec("embed", ("minilm",), ("--runner", "pooling")),
    # One BERT cross-encoder under two names: the rerank kind and the score kind.
    "cross": Spec("cross", ("bert-rerank", "bert-score"), ("--runner", "pooling")),
    "whisper": Spec("whisper", ("tiny-whisper",)),
}

ENV = {
    "VLLM_TARGET_DEVICE": "cpu",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_HOST_IP": "127.0.0.1",  # the engine's internal ZMQ sockets stay on loopback
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # with --distributed-executor-backend uni
    "VLLM_LOGGING_LEVEL": "WARNING",
    # stored Responses API answers: previous_response_id and GET /v1/responses/{id}
    "VLLM_ENABLE_RESPONSES_API_STORE": "1",
}


@dataclass(slots=True)
class Engine:
    """A running ``vllm serve``: its kind, served names, base URL, process and log."""

    spec: Spec
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    started: float = field(default_factory=time.monotonic)
    ready_after: float | None = None


def venv() -> Path:
    return Path(os.environ.get("VLLM_VENV", ROOT / ".venv-vllm"))


def build_models(out: Path | None = None) -> dict[str, Path]:
    """Run ``build_models.py`` with the vLLM venv's Python; kind → model directory."""
    cmd = [str(venv() / "bin" / "python"), str(HERE / "build_models.py")]
    if out is not None:
        cmd += ["--out", str(out)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return {k: Path(v) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command(spec: Spec, model_dir: Path, port: int) -> list[str]:
    return [
        str(venv() / "bin" / "vllm"), "serve", str(model_dir),
        "--served-model-name", *spec.names,
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--enforce-eager",
        "--distributed-executor-backend", "uni",
        "--kv-cache-memory-bytes", str(spec.kv_cache_bytes),
        *spec.flags,
    ]


def launch(spec: Spec, model_dir: Path, log_dir: Path) -> Engine:
    port = free_port()
    log = log_dir / f"vllm-{spec.kind}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            command(spec, model_dir, port), stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, **ENV, **dict(spec.env)}, start_new_session=True, cwd=log_dir,
        )
    return Engine(spec, f"http://127.0.0.1:{port}", proc, log)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def start(models: dict[str, Path], log_dir: Path, kinds: tuple[str, ...] = tuple(SPECS),
          timeout: float = 900) -> dict[str, Engine]:
    """Start the servers together and wait until all are healthy; RuntimeError if not.

    On failure every server already started is stopped and the message carries the tail
    of the failing server's log.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    engines = {kind: launch(SPECS[kind], models[kind], log_dir) for kind in kinds}
    deadline = time.monotonic() + timeout
    try:
        while pending := [e for e in engines.values() if e.ready_after is None]:
            for engine in pending:
                if engine.proc.poll() is not None:
                    raise RuntimeError(f"vllm serve ({engine.spec.kind}) exited with "
                                       f"{engine.proc.returncode}:\n{tail(engine.log)}")
                if healthy(engine.url):
                    engine.ready_after = time.monotonic() - engine.started
            if time.monotonic() > deadline:
                slow = ", ".join(e.spec.kind for e in pending)
                raise RuntimeError(f"vllm serve ({slow}) not healthy after {timeout:.0f} s:\n"
                                   + "\n".join(tail(e.log) for e in pending))
            time.sleep(0.5)
    except BaseException:
        stop(engines)
        raise
    return engines


def tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {log})"


def stop(engines: dict[str, Engine]) -> None:
    """SIGTERM each server's process group, then SIGKILL what is left after 20 s."""
    for engine in engines.values():
        if engine.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(engine.proc.pid, signal.SIGTERM)
    for engine in engines.values():
        try:
            engine.proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(engine.proc.pid, signal.SIGKILL)
            engine.proc.wait(5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default=",".join(SPECS), help="comma-separated kinds")
    parser.add_argument("--log-dir", type=Path, default=Path.cwd() / "vllm-logs")
    parser.add_argument("--models", type=Path, default=None, help="model cache directory")
    args = parser.parse_args()
    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = set(kinds) - set(SPECS)
    if unknown:
        parser.error(f"unknown kinds {sorted(unknown)}; choose from {', '.join(SPECS)}")
    t0 = time.monotonic()
    models = build_models(args.models)
    t1 = time.monotonic()
    engines = start(models, args.log_dir, kinds)
    print(json.dumps({k: {"url": e.url, "names": e.spec.names,
                          "ready_after_s": round(e.ready_after or 0, 1)}
                      for k, e in engines.items()}), flush=True)
    print(f"models {t1 - t0:.1f} s, engines healthy after {time.monotonic() - t1:.1f} s; "
          "Ctrl-C stops them", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while all(e.proc.poll() is None for e in engines.values()):
            time.sleep(1)
        return 1
    except (KeyboardInterrupt, SystemExit):
        return 0
    finally:
        stop(engines)


if __name__ == "__main__":
    sys.exit(main())
