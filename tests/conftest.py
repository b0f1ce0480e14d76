"""Shared fixtures: the array backends and the optional dependencies.

Backends are parametrised through the ``xp`` fixture: NumPy always, array-api-strict
(the proof that only the standard is used), and CuPy (marker ``gpu``) where a CUDA device
exists; PyTorch tensors and JAX arrays run the core matrix in ``tests/test_backends.py``.
A missing optional backend or dependency is skipped locally, but the environment variable
``NLREF_REQUIRE`` (comma separated, e.g. ``torch,array_api_strict``) turns it into a
failure: CI sets it so that nothing passes by skipping.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any, NoReturn

import array_api_compat
import numpy as np
import pytest

REQUIRED = {s.strip() for s in os.environ.get("NLREF_REQUIRE", "").split(",") if s.strip()}
KNOWN_REQUIREMENTS = {"torch", "jax", "array_api_strict", "cupy"}
KNOWN_REQUIREMENTS |= {"torch.cuda"}  # PyTorch with a CUDA device
KNOWN_REQUIREMENTS |= {"mmcv", "pytorchvideo", "timm"}  # the real modules of the oracle tests
KNOWN_REQUIREMENTS |= {"matplotlib", "jupytext"}  # nlref.viz, the notebooks
KNOWN_REQUIREMENTS |= {"mmsegmentation"}  # the disentangled non-local block's real module
KNOWN_REQUIREMENTS |= {"chromium"}  # the explorer's page in a real browser (Debian's chromium)

# Hypothesis profiles for the property-based tests (tests/test_hypothesis.py), chosen with
# HYPOTHESIS_PROFILE: "ci" (the default: few examples, derandomized so that CI is
# reproducible, no example database), "dev" (5x the examples, random, with a database) and
# "thorough" (25x). Each test asks for a multiple of the profile's max_examples; see
# tests/test_hypothesis.py. Hypothesis is in the "test" extra: its tests fail without it.
HYPOTHESIS_PROFILES = {"ci": 40, "dev": 200, "thorough": 1000}
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover - the test extra installs it
    pass
else:
    for _name, _examples in HYPOTHESIS_PROFILES.items():
        settings.register_profile(
            _name,
            max_examples=_examples,
            deadline=None,  # timings on a shared CI machine are noise
            suppress_health_check=[HealthCheck.too_slow],
            print_blob=True,
            **({"derandomize": True, "database": None} if _name == "ci" else {}),
        )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config: pytest.Config) -> None:
    unknown = REQUIRED - KNOWN_REQUIREMENTS
    if unknown:
        raise pytest.UsageError(
            f"NLREF_REQUIRE names unknown requirements {sorted(unknown)}; "
            f"known: {sorted(KNOWN_REQUIREMENTS)}"
        )


#: the requirements that are a CUDA device, not only a module: how to see one
CUDA_DEVICE = {
    "cupy": lambda cupy: cupy.cuda.runtime.getDeviceCount() > 0,
    "torch.cuda": lambda cuda: cuda.is_available(),
}


def require(name: str) -> Any:
    """Import ``name``; skip the test if it is missing, or fail if NLREF_REQUIRE names it.

    ``cupy`` and ``torch.cuda`` also need a visible CUDA device; a dotted name requires its
    package first. A submodule that is not a requirement of its own (``mmcv.cnn``) is its
    package's: NLREF_REQUIRE=mmcv makes a broken ``mmcv.cnn`` a failure, not a skip.
    """
    package = name.partition(".")[0]
    if "." in name:
        require(package)

    def load() -> Any:
        module = importlib.import_module(name)
        if name in CUDA_DEVICE and not CUDA_DEVICE[name](module):
            raise ImportError(f"{name} is installed but no CUDA device is visible")
        return module

    return require_loaded(name if name in KNOWN_REQUIREMENTS else package, load)


def require_loaded(name: str, load: Callable[[], Any]) -> Any:
    """``load()``; if it raises (ImportError, a CUDA runtime error, a broken third-party
    import), skip the test, or fail it where NLREF_REQUIRE names ``name``."""
    try:
        return load()
    except Exception as err:
        unavailable(name, str(err))


def unavailable(name: str, why: str) -> NoReturn:
    """Skip because ``name`` is not available (``why``), or fail where NLREF_REQUIRE names
    it."""
    if name in REQUIRED:
        pytest.fail(f"{name} is required (NLREF_REQUIRE={sorted(REQUIRED)}) but: {why}")
    pytest.skip(f"{name} not available: {why}")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``nlref ARGV`` in this process: the exit status, stdout and stderr."""
    from nlref import cli

    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


BACKENDS = [
    "numpy",
    "array_api_strict",
    pytest.param("cupy", marks=pytest.mark.gpu),
]


def namespace(backend: str) -> Any:
    """The array namespace of ``backend`` (array-api-compat's wrapper for NumPy and CuPy)."""
    if backend == "numpy":
        return array_api_compat.array_namespace(np.empty(0))
    module = require(backend)
    if backend == "cupy":
        return array_api_compat.array_namespace(module.empty(0))
    return module


@pytest.fixture(params=BACKENDS)
def xp(request: pytest.FixtureRequest) -> Any:
    """The array namespace under test."""
    return namespace(request.param)


@pytest.fixture(params=["numpy", "array_api_strict"])
def cpu_xp(request: pytest.FixtureRequest) -> Any:
    """The backends the engine's worker threads run on (CuPy, PyTorch and JAX arrays run
    on the calling thread)."""
    return namespace(request.param)


def require_torch() -> Any:
    """PyTorch, for the independent autograd reference, on one thread: the reference runs
    on tiny tensors, where OpenMP's thread hand-off costs far more than it saves (and
    stalls badly on a busy 2-core machine)."""
    module = require("torch")
    module.set_num_threads(1)
    return module


@pytest.fixture
def torch() -> Any:
    """PyTorch (see :func:`require_torch`)."""
    return require_torch()
