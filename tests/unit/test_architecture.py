"""docs/architecture.md's module tables match the package, and imports follow its layers."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "router"
DOC = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")


def _table(name: str) -> list[list[str]]:
    block = DOC.split(f"<!-- {name}:begin -->")[1].split(f"<!-- {name}:end -->")[0]
    rows = [line for line in block.strip().splitlines()[2:] if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in PACKAGE.rglob("*.py") if "migrations" not in p.parts}
LAYERS = {f"router.{row[1].strip('`').removesuffix('.py')}".removesuffix(".__init__"):
          int(row[0]) for row in _table("modules")}


def _imports(path: Path) -> set[str]:
    """Every ``router`` module ``path`` imports: at module level, in functions, and under
    ``if TYPE_CHECKING`` alike."""
    name = _module(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def test_every_core_module_is_in_the_table() -> None:
    core = {m for m, p in MODULES.items() if p.parent == PACKAGE}
    assert set(LAYERS) == core


def test_every_subpackage_module_is_in_the_table() -> None:
    listed = {f"router.{row[0].strip('`').removesuffix('.py')}".replace("/", ".")
              .removesuffix(".__init__") for row in _table("subpackages")}
    sub = {m for m, p in MODULES.items() if p.parent != PACKAGE}
    assert listed == sub


def test_core_modules_import_only_lower_layers() -> None:
    wrong = [f"{m} (layer {LAYERS[m]}) imports {d} (layer {LAYERS[d]})"
             for m in LAYERS for d in sorted(GRAPH[m]) if d in LAYERS and LAYERS[d] >= LAYERS[m]]
    assert wrong == []


def test_subpackages_import_only_core_modules_and_their_own() -> None:
    wrong = []
    for m, deps in GRAPH.items():
        if m in LAYERS:
            continue
        own = ".".join(m.split(".")[:2])
        wrong += [f"{m} imports {d}" for d in sorted(deps)
                  if d not in LAYERS and not d.startswith(own)]
    assert wrong == []


def test_no_import_cycles() -> None:
    cycles: list[str] = []
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycles.append(" -> ".join([*path[path.index(node):], node]))
            return
        if node in done:
            return
        for dep in sorted(GRAPH[node]):
            visit(dep, [*path, node])
        done.add(node)

    for name in sorted(GRAPH):
        visit(name, [])
    assert cycles == []


def test_the_request_path_reads_in_four_files() -> None:
    """The doc's first table names the files of the request path; each exists."""
    files = re.findall(r"^\| `router/(\w+\.py)` \|", DOC, re.MULTILINE)
    assert files == ["app.py", "proxy.py", "relay.py", "upstream.py"]
    assert all((PACKAGE / f).exists() for f in files)
