"""Render compat outcomes: a plain-text table for the terminal, and Markdown for docs.

The Markdown ends with a ``<!-- routeyard-compat {...} -->`` comment holding the run's
facts as JSON (engine version, date, task, and per path whether every probe passed);
``router.supported_apis`` reads it to fill the "verified" column of docs/supported-apis.md.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from router.compat.compare import IGNORED_FIELDS, Outcome

MARKER = "routeyard-compat"
_COMMENT = re.compile(r"<!-- " + MARKER + r" (\{.*?\}) -->", re.DOTALL)


@dataclass(frozen=True, slots=True)
class RunInfo:
    """What was compared: endpoints, model names, task, engine version, time."""

    engine: str
    router: str
    model: str
    engine_model: str
    task: str
    engine_version: str
    date: str  # ISO 8601, UTC


def _rows(outcomes: Sequence[Outcome]) -> list[list[str]]:
    return [[o.probe.name, f"POST {o.probe.path}", o.engine.summary(), o.router.summary(),
             "same" if o.ok else "DIFFERENT"] for o in outcomes]


HEAD = ["probe", "request", "engine", "router", "result"]


def text(info: RunInfo, outcomes: Sequence[Outcome]) -> str:
    """The terminal report: a header, an aligned table, then each difference."""
    rows = [HEAD, *_rows(outcomes)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEAD))]
    lines = [
        f"routeyard compat: task {info.task}, model {info.model} "
        f"(engine serves {info.engine_model}), vLLM {info.engine_version}",
        f"  engine {info.engine}  router {info.router}",
        "",
    ]
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    failed = [o for o in outcomes if not o.ok]
    if failed:
        lines.append("")
        for o in failed:
            lines.append(f"{o.probe.name} (POST {o.probe.path}):")
            lines += [f"  - {d}" for d in o.differences]
    lines.append("")
    lines.append(summary(outcomes))
    return "\n".join(lines) + "\n"


def summary(outcomes: Sequence[Outcome]) -> str:
    failed = sum(not o.ok for o in outcomes)
    verdict = "no differences" if not failed else f"{failed} with differences"
    return f"{len(outcomes)} probes, {verdict}"


def _cell(value: str) -> str:
    return value.replace("|", "\\|").replace("\n", " ")


def markdown(info: RunInfo, outcomes: Sequence[Outcome]) -> str:
    """The same report as Markdown, plus the machine-readable summary comment."""
    lines = [
        f"# routeyard compat: `{info.model}` ({info.task})",
        "",
        f"- date: {info.date}",
        f"- engine: vLLM {info.engine_version} serving `{info.engine_model}`",
        f"- router: public model `{info.model}`",
        f"- result: {summary(outcomes)}",
        f"- ignored per-request fields: {', '.join(f'`{f}`' for f in sorted(IGNORED_FIELDS))}",
        "",
        "| " + " | ".join([*HEAD, "differences"]) + " |",
        "|" + "---|" * (len(HEAD) + 1),
    ]
    for outcome, row in zip(outcomes, _rows(outcomes), strict=True):
        differences = "<br>".join(_cell(d) for d in outcome.differences)
        lines.append("| " + " | ".join([*map(_cell, row), differences]) + " |")
    facts = {
        "vllm": info.engine_version,
        "date": info.date,
        "task": info.task,
        "paths": verified_paths(outcomes),
    }
    lines += ["", f"<!-- {MARKER} {orjson.dumps(facts).decode()} -->", ""]
    return "\n".join(lines)


def verified_paths(outcomes: Sequence[Outcome]) -> dict[str, bool]:
    """Path → True when every probe sent to it (errors included) had no difference."""
    paths: dict[str, bool] = {}
    for o in outcomes:
        paths[o.probe.path] = paths.get(o.probe.path, True) and o.ok
    return dict(sorted(paths.items()))


def read_facts(markdown_text: str) -> dict[str, Any] | None:
    """The summary comment of a report written by ``markdown``, or None."""
    match = _COMMENT.search(markdown_text)
    return orjson.loads(match.group(1)) if match else None
