"""Lazy public names for the subpackages of `search`.

Each subpackage's `__init__` names its public API and the private module that defines each name;
the module is imported when a name is first used. So `from search.optimizer import SAMPLERS`
(the command line's input checks) does not import Ray and Optuna, which `ParetoSearch` needs and
which take seconds. This is the pattern of scientific Python's `lazy_loader` (SPEC 1), in a few
lines instead of a dependency.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def attach(package: str, exports: dict[str, list[str]]) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """(`__all__`, `__getattr__`, `__dir__`) for `package`, from {private module: [names]}."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    def __dir__() -> list[str]:
        return sorted(where)

    return sorted(where), __getattr__, __dir__
