"""Shared fixtures: the array backends and the optional dependencies.

Backends are parametrised through the ``xp`` fixture: NumPy always, array-api-strict
(the proof that only the standard is used), and CuPy (marker ``gpu``) where a CUDA device
exists. A missing optional backend or dependency is skipped locally, but the environment
variable ``NLREF_REQUIRE`` (comma separated, e.g. ``torch,array_api_strict``) turns it into
a failure: CI sets it so that nothing passes by skipping.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import numpy as np
import pytest

REQUIRED = {s.strip() for s in os.environ.get("NLREF_REQUIRE", "").split(",") if s.strip()}
KNOWN_REQUIREMENTS = {"torch", "array_api_strict", "cupy"}


def pytest_configure(config: pytest.Config) -> None:
    unknown = REQUIRED - KNOWN_REQUIREMENTS
    if unknown:
        raise pytest.UsageError(
            f"NLREF_REQUIRE names unknown requirements {sorted(unknown)}; "
            f"known: {sorted(KNOWN_REQUIREMENTS)}"
        )


def require(name: str) -> Any:
    """Import ``name``; skip the test if it is missing, or fail if NLREF_REQUIRE names it."""
    try:
        module = importlib.import_module(name)
        if name == "cupy" and module.cuda.runtime.getDeviceCount() < 1:
            raise ImportError("CuPy is installed but no CUDA device is visible")
    except Exception as err:  # ImportError, or CUDA runtime errors from CuPy
        if name in REQUIRED:
            pytest.fail(f"{name} is required (NLREF_REQUIRE={sorted(REQUIRED)}) but: {err}")
        pytest.skip(f"{name} not available: {err}")
    return module


BACKENDS = [
    "numpy",
    "array_api_strict",
    pytest.param("cupy", marks=pytest.mark.gpu),
]


@pytest.fixture(params=BACKENDS)
def xp(request: pytest.FixtureRequest) -> Any:
    """The array namespace under test (array-api-compat's wrapper for NumPy and CuPy)."""
    import array_api_compat

    if request.param == "numpy":
        return array_api_compat.array_namespace(np.empty(0))
    module = require(request.param)
    if request.param == "cupy":
        return array_api_compat.array_namespace(module.empty(0))
    return module


@pytest.fixture
def torch() -> Any:
    """PyTorch, in float64, for the independent autograd reference."""
    return require("torch")
