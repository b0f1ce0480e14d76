"""Subcommands of the ``nlref`` command line, one module each.

A module here that defines ``add_parser(subparsers)`` is a subcommand: :func:`nlref.cli.main`
discovers it, so adding a subcommand means adding one file. ``add_parser`` adds its
subparser and sets ``func=handler`` with ``handler(args, out) -> int`` (the exit status).
Handlers raise :class:`CLIError` for usage problems found after parsing (exit status 2).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["BACKENDS", "CLIError", "iter_commands", "load_backend"]

BACKENDS = ("numpy", "array_api_strict", "cupy")


class CLIError(Exception):
    """A usage problem found after parsing (for example an unavailable backend): exit 2."""


def load_backend(name: str) -> Any:
    """Import the array namespace called ``name``.

    Raises
    ------
    CLIError
        If the library cannot be imported, or (CuPy) no CUDA device is visible.
    """
    if name not in BACKENDS:
        raise CLIError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    try:
        import array_api_compat

        if name == "numpy":
            return array_api_compat.array_namespace(np.empty(0))
        module = importlib.import_module(name)
        if name == "cupy":
            if module.cuda.runtime.getDeviceCount() < 1:
                raise RuntimeError("CuPy is installed but no CUDA device is visible")
            return array_api_compat.array_namespace(module.empty(0))
        return module
    except Exception as err:  # ImportError, or CUDA runtime errors from CuPy
        hint = {
            "cupy": "install nlref[gpu] (cupy-cuda12x) on a machine with a CUDA device",
            "array_api_strict": "pip install array-api-strict",
        }.get(name, "")
        raise CLIError(
            f"backend {name!r} is not available ({type(err).__name__}: {err})"
            + (f"; {hint}" if hint else "")
        ) from err


def iter_commands() -> Iterator[ModuleType]:
    """The subcommand modules of this package, in name order."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            module = importlib.import_module(f"{__name__}.{info.name}")
            if hasattr(module, "add_parser"):
                yield module
