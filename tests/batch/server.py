"""Test processes: ``python -m tests.batch.server serve|worker SPEC.json [PORT]``.

``serve`` runs a Sanic app with only ``router.batch.register`` routes (plus /health) and
in-process workers; ``worker`` runs ``run_worker`` alone. SPEC holds the BatchConfig,
the engine URLs and the tenant allowlists. Tenants come from ``Authorization: Bearer
key-<tenant>``; ``Bearer open`` means no tenant (auth off).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys

from sanic import HTTPResponse, Request, Sanic

from router.batch import BatchConfig, BatchService, register, run_worker
from router.errors import ClientError
from tests.batch.dispatcher import build


class Unauthorized(ClientError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


def tenant_of(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    key = auth.removeprefix("Bearer ").strip()
    if key == "open":
        return None
    if key.startswith("key-") and len(key) > 4:
        return key[4:]
    raise Unauthorized("Incorrect API key provided.")


def serve(spec: dict, port: int) -> None:
    config = BatchConfig.model_validate(spec["config"])
    app = Sanic(f"batch_test_{port}")
    app.config.update(ACCESS_LOG=False, RESPONSE_TIMEOUT=600, REQUEST_TIMEOUT=600)
    service = BatchService(config)
    register(app, service, tenant_of)
    dispatcher = build(spec["engines"], spec.get("tenants"))

    @app.before_server_start
    async def start(app: Sanic) -> None:
        await service.start(dispatcher)

    @app.after_server_stop
    async def stop(app: Sanic) -> None:
        await service.close(grace=5)
        await dispatcher.aclose()

    @app.get("/health")
    async def health(request: Request) -> HTTPResponse:
        return HTTPResponse(b'{"status":"ok"}', content_type="application/json")

    app.run(host="127.0.0.1", port=port, single_process=True, access_log=False, motd=False)


async def worker(spec: dict) -> None:
    config = BatchConfig.model_validate(spec["config"])
    dispatcher = build(spec["engines"], spec.get("tenants"))
    try:
        await run_worker(config, dispatcher, workers=spec.get("workers"))
    finally:
        await dispatcher.aclose()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    command, path = sys.argv[1], sys.argv[2]
    with open(path) as f:
        spec = json.load(f)
    if command == "serve":
        serve(spec, int(sys.argv[3]))
    else:
        asyncio.run(worker(spec))


if __name__ == "__main__":
    main()
