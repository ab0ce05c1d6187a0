"""``python -m router.fake_engine --model m --task generate --port 8001``."""

from __future__ import annotations

import argparse

from router.fake_engine.app import run
from router.fake_engine.serving import ServingParams
from router.fake_engine.state import TASKS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m router.fake_engine")
    parser.add_argument("--model", action="append", required=True, help="served model name")
    parser.add_argument("--task", choices=TASKS, default="generate")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-ms", type=float, default=0)
    parser.add_argument("--token-delay-ms", type=float, default=0)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--simulate", action="store_true",
                        help="serve chat through a serving model of a vLLM engine, with "
                             "vLLM's /metrics")
    parser.add_argument("--serving", action="append", default=[], metavar="NAME=VALUE",
                        help="a serving-model parameter (with --simulate), e.g. "
                             "max_num_seqs=32; repeatable")
    parser.add_argument("--lora", action="append", default=[],
                        help="a LoRA adapter of the first model, loaded at start")
    args = parser.parse_args(argv)
    serving = None
    if args.simulate:
        try:
            serving = ServingParams.parse(args.serving)
        except ValueError as exc:
            parser.error(str(exc))
    elif args.serving:
        parser.error("--serving needs --simulate")
    run(args.model, args.task, args.host, args.port, latency_ms=args.latency_ms,
        token_delay_ms=args.token_delay_ms, tokens=args.tokens, serving=serving,
        loras=args.lora)


if __name__ == "__main__":
    main()
