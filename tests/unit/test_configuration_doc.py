"""docs/configuration.md lists every process setting and every key of routes.yaml.

The settings come from ``router.settings.Settings`` (each field is the environment variable
``ROUTEYARD_<FIELD>``) and the flags of ``routeyard serve`` and ``batch-worker``; the keys
from the config models, walked recursively from ``router.config.RoutesFile`` (``auth:`` and
``batch:`` included).
A field missing from the doc fails, and so does a doc row that names no setting or key.
batch.md's own table of the ``batch:`` keys is held to the same rule.
"""

from __future__ import annotations

import re
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import pytest
from pydantic import BaseModel

from router.cli import main
from router.config import RoutesFile
from router.settings import Settings

DOCS = Path(__file__).resolve().parents[2] / "docs"

#: Variables of the libraries routeyard runs on, documented with the settings.
LIBRARY_VARIABLES = {"WATCHFILES_FORCE_POLLING", "OTEL_*", "PROMETHEUS_MULTIPROC_DIR"}

_HEADING = re.compile(r"^(#{2,4}) (.*)$")
_CODE = re.compile(r"`([^`]+)`")


def tables(text: str) -> Iterator[tuple[str, list[list[str]]]]:
    """(heading, rows as lists of cells) for every table, header and rule rows dropped."""
    heading, rows = "", []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        if rows:
            yield heading, rows[2:]
            rows = []
        if match := _HEADING.match(line):
            heading = match[2].strip()


def cell_names(cell: str) -> list[str]:
    """The names a first cell lists: `a.b`, `.c` means a.c (a sibling of the one before)."""
    names: list[str] = []
    for name in _CODE.findall(cell):
        if name.startswith(".") and names:
            parent = names[-1].rpartition(".")[0]
            name = f"{parent}{name}" if parent else name[1:]
        names.append(name)
    return names


def normalize(path: str) -> str:
    return re.sub(r"<[^>]*>", "<*>", path)


# --- process settings ------------------------------------------------------------------

def documented_variables(text: str) -> list[str]:
    found = []
    for heading, rows in tables(text):
        if heading == "Process settings":
            found += [name for row in rows for name in _CODE.findall(row[1])]
    return found


def test_every_setting_is_documented_and_every_row_is_a_setting() -> None:
    documented = documented_variables((DOCS / "configuration.md").read_text())
    assert len(documented) == len(set(documented)), "a variable documented twice"
    settings = {f"ROUTEYARD_{name.upper()}" for name in Settings.model_fields}
    assert settings - set(documented) == set(), "settings missing from configuration.md"
    assert set(documented) - settings - LIBRARY_VARIABLES == set(), "rows naming no setting"


def test_every_flag_of_the_settings_is_documented(capsys: pytest.CaptureFixture[str]) -> None:
    """The table's flags are those of ``serve`` and of ``batch-worker`` together."""
    flags = set()
    for each in ("serve", "batch-worker"):
        with pytest.raises(SystemExit):
            main([each, "--help"])
        given = set(re.findall(r"(--[a-z][a-z-]*)", capsys.readouterr().out)) - {"--help"}
        assert given, each
        flags |= given
    documented = set()
    for heading, rows in tables((DOCS / "configuration.md").read_text()):
        if heading == "Process settings":
            documented |= {name.split()[0] for row in rows for name in _CODE.findall(row[0])}
    assert flags and flags == documented


# --- routes.yaml -----------------------------------------------------------------------

def _models_in(annotation: Any) -> Iterator[tuple[str, type[BaseModel]]]:
    """(path suffix, model) for each model a field's type holds: directly (""), as list
    items ("[]") or as mapping values (".<*>")."""
    origin = get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield "", annotation
    elif origin is Annotated:
        yield from _models_in(get_args(annotation)[0])
    elif origin in (Union, types.UnionType):
        for arg in get_args(annotation):
            yield from _models_in(arg)
    elif origin in (list, tuple, set, frozenset):
        for suffix, model in _models_in(get_args(annotation)[0]):
            yield "[]" + suffix, model
    elif origin is dict:
        for suffix, model in _models_in(get_args(annotation)[1]):
            yield ".<*>" + suffix, model


def model_places(root: type[BaseModel] = RoutesFile) -> dict[type[BaseModel], set[str]]:
    """Every config model and the key paths it appears at (``""`` for the file itself)."""
    places: dict[type[BaseModel], set[str]] = {root: {""}}
    todo = [(root, "")]
    while todo:
        model, path = todo.pop()
        for name, field in model.model_fields.items():
            for suffix, child in _models_in(field.annotation):
                child_path = f"{path}.{name}{suffix}".lstrip(".")
                if child_path not in places.setdefault(child, set()):
                    places[child].add(child_path)
                    todo.append((child, child_path))
    return places


def all_paths(places: dict[type[BaseModel], set[str]]) -> set[str]:
    return {f"{place}.{name}".lstrip(".") for model, at in places.items() for place in at
            for name in model.model_fields}


def documented_keys(text: str, sections: dict[str, str] | None = None) -> list[str]:
    """Full key paths of the key tables: those under a heading that is one `path` (the
    prefix of their rows) or under "Top-level keys"; ``sections`` maps other headings."""
    keys = []
    for heading, rows in tables(text):
        if sections and heading in sections:
            prefix = sections[heading]
        elif heading == "Top-level keys":
            prefix = ""
        elif match := re.fullmatch(r"`([^`]+)`", heading):
            prefix = match[1]
        else:
            continue
        for row in rows:
            keys += [normalize(f"{prefix}.{name}".lstrip(".")) for name in cell_names(row[0])]
    return keys


def uncovered(places: dict[type[BaseModel], set[str]], keys: set[str]) -> set[str]:
    """Fields documented at none of their model's places: at one place is enough (the
    per-model `timeouts` are the `defaults.timeouts` keys); a mapping or list of models
    counts as documented when its members' keys are."""
    missing = set()
    for model, at in places.items():
        for name in model.model_fields:
            paths = {f"{place}.{name}".lstrip(".") for place in at}
            if not any(p in keys or any(k.startswith((f"{p}.", f"{p}[")) for k in keys)
                       for p in paths):
                missing.add(min(paths))
    return missing


def test_the_walk_finds_nested_lists_and_mappings() -> None:
    paths = all_paths(model_places())
    assert {"models.<*>.backends[].url", "defaults.health_checks.interval",
            "auth.keys[].model_limits.<*>.rpm", "auth.admin_keys[].key_file",
            "batch.storage.url", "batch.max_attempts"} <= paths
    assert cell_names("`storage.endpoint`, `.region`, `workers`") == [
        "storage.endpoint", "storage.region", "workers"]


def test_every_key_of_routes_yaml_is_documented_and_every_row_is_a_key() -> None:
    keys = documented_keys((DOCS / "configuration.md").read_text())
    assert len(keys) == len(set(keys)), "a key documented twice"
    places = model_places()
    assert uncovered(places, set(keys)) == set(), "keys missing from configuration.md"
    assert set(keys) - all_paths(places) == set(), "rows naming no key of routes.yaml"


def test_batch_md_lists_every_batch_key() -> None:
    keys = set(documented_keys((DOCS / "batch.md").read_text(), {"All settings": "batch"}))
    places = {model: {p for p in at if p.startswith("batch")}
              for model, at in model_places().items()}
    places = {model: at for model, at in places.items() if at}
    assert uncovered(places, keys) == set(), "batch: keys missing from batch.md"
    assert keys - all_paths(places) == set(), "batch.md rows naming no batch: key"
