"""Packages whose names are imported on first use, so light commands (``perturbdiff --help``) start fast."""

from __future__ import annotations

from importlib import import_module
from typing import Any


def lazy_names(package: str, where: dict[str, str], namespace: dict[str, Any]):
    """A module ``__getattr__`` for ``package``: ``name`` comes from ``package.<where[name]>`` when first used and
    is then cached in the package's ``namespace``."""

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f"{package}.{where[name]}"), name)
        namespace[name] = value
        return value

    return __getattr__
