"""Lazy re-exports for package ``__init__`` modules (PEP 562): a name's module is imported
on first use, so importing a package costs nothing until its exports are needed."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping


def exports(package: str, where: Mapping[str, str], names: Iterable[str]
            ) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``where`` maps each exported name
    to the module that defines it; ``names`` is the package's ``__all__``."""
    listed = frozenset(names)

    def __getattr__(name: str) -> object:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *listed})

    return __getattr__, __dir__
