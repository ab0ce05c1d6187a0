"""Running a compat suite: each probe to the engine, then through the router; the report.

``run`` is what ``routeyard compat`` calls (re-exported by ``router.compat``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import httpx

import router.compat.report as report
from router.compat.compare import Answer, Outcome, compare, media_type, parse_sse
from router.compat.requests import Probe, suite

DEFAULT_TIMEOUT = 120.0


def send(client: httpx.Client, probe: Probe, model: str) -> Answer:
    """Send one probe and read the whole answer; transport failures become ``error``."""
    try:
        response = client.request("POST", probe.path, **probe.build(model))
    except httpx.HTTPError as exc:
        return Answer(error=f"{type(exc).__name__}: {exc or 'no detail'}")
    answer = Answer(response.status_code, response.headers.get("content-type", ""),
                    response.content)
    if media_type(answer.content_type) == "text/event-stream":
        answer.events = parse_sse(answer.body)
    return answer


def compare_all(engine: httpx.Client, router: httpx.Client, probes: Sequence[Probe],
                model: str, engine_model: str) -> list[Outcome]:
    """Each probe to the engine (served name), then to the router (public name)."""
    names = frozenset({model, engine_model})
    return [compare(p, send(engine, p, engine_model), send(router, p, model), names)
            for p in probes]


def engine_version(client: httpx.Client) -> str:
    """The engine's ``GET /version``, or "unknown" (not every deployment exposes it)."""
    try:
        response = client.get("/version")
        version = response.json().get("version") if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        version = None
    return str(version) if version else "unknown"


def parse_header(value: str) -> tuple[str, str]:
    """``"Name: value"`` → (name, value); raise ValueError naming the expected form."""
    name, sep, rest = value.partition(":")
    if not sep or not name.strip():
        raise ValueError(f"header {value!r} is not of the form 'Name: value'")
    return name.strip(), rest.strip()


def run(
    engine: str,
    router: str,
    model: str,
    task: str,
    *,
    engine_model: str | None = None,
    groups: Sequence[str] | None = None,
    markdown: str | Path | None = None,
    engine_headers: Mapping[str, str] | None = None,
    router_headers: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    out: TextIO | None = None,
) -> int:
    """Run the ``task`` suite; print the table to ``out``; 0 if nothing differs, else 1.

    ``model`` is the router's public name; ``engine_model`` the engine's served name when
    the router rewrites it (default: the same). ``groups`` limits the suite to routes of
    those endpoint groups, for a model whose allowlist enables only some of them.
    """
    out = out or sys.stdout
    probes = suite(task, frozenset(groups) if groups else None)
    engine_model = engine_model or model
    with (
        httpx.Client(base_url=engine.rstrip("/"), timeout=timeout,
                     headers=dict(engine_headers or {})) as engine_client,
        httpx.Client(base_url=router.rstrip("/"), timeout=timeout,
                     headers=dict(router_headers or {})) as router_client,
    ):
        version = engine_version(engine_client)
        outcomes = compare_all(engine_client, router_client, probes, model, engine_model)
    info = report.RunInfo(
        engine=engine, router=router, model=model, engine_model=engine_model, task=task,
        engine_version=version,
        date=datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
    )
    out.write(report.text(info, outcomes))
    if markdown is not None:
        Path(markdown).write_text(report.markdown(info, outcomes), encoding="utf-8")
    return 0 if all(o.ok for o in outcomes) else 1
