"""Any array-API library: the same ``forward`` and ``backward`` on PyTorch tensors and JAX
arrays.

nlref takes its array namespace from its inputs (array-api-compat), so the block runs
unchanged on PyTorch tensors and JAX arrays, not only on NumPy, CuPy and array-api-strict
(the ``xp`` fixture of the other tests). Here, in float64 (JAX with ``jax_enable_x64``):

- the core matrix, every variant × 1D/2D/3D × pooling × norm × biases, on the reference
  path and on the engine's tiles, agrees with NumPy to 1e-12 of each tensor's largest
  entry (of the largest gradient entry for the gradients, some of which are 0 by
  construction and rounding noise on both sides);
- what comes back (z, dx, every gradient, the attention, the BN buffers) is of the input's
  library, dtype and device;
- nothing copies a tensor through NumPy on the way: while forward and backward run,
  ``nlref.to_numpy``, NumPy's converters on tensors and the tensors' own ways out to NumPy
  or to Python numbers raise; and JAX can trace the whole block with ``jax.jit`` (a traced
  array has no values to copy);
- ``threads > 1`` is refused with a clear error (PyTorch and JAX run their own thread
  pools), and ``threads=None`` means one thread however large the problem;
- CUDA tensors stay on their device, where a GPU is present.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np
import pytest

import nlref
from nlref import engine

from . import grid
from .conftest import require, require_torch

CASES = grid.matrix()
CHUNK = grid.N // 2  # the engine's path: two tiles of queries
ROWS = (CHUNK, grid.N)  # the second tile: the shapes of a tile


@dataclass(frozen=True)
class Library:
    """An array library under test: how to make its arrays, and how to recognise them."""

    name: str
    asarray: Callable[[np.ndarray], Any]
    is_array: Callable[[Any], bool]
    device: Callable[[Any], Any]
    array_types: tuple[type, ...]


def torch_library(device: str = "cpu") -> Library:
    torch = require_torch()
    return Library(
        name="torch" if device == "cpu" else f"torch-{device}",
        asarray=lambda a: torch.tensor(a, device=device),
        is_array=array_api_compat.is_torch_array,
        device=lambda a: a.device,
        array_types=(torch.Tensor,),
    )


def jax_library() -> Library:
    jax = require("jax")
    return Library(
        name="jax",
        asarray=lambda a: jax.numpy.asarray(a),
        is_array=array_api_compat.is_jax_array,
        device=lambda a: a.devices(),
        array_types=(type(jax.numpy.zeros(1)),),
    )


@pytest.fixture(scope="module")
def jax_x64() -> Iterator[Any]:
    """JAX with float64 enabled for this module, and the setting back afterwards."""
    jax = require("jax")
    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    yield jax
    jax.config.update("jax_enable_x64", previous)


@pytest.fixture(scope="module", params=["torch", "jax"])
def lib(request: pytest.FixtureRequest) -> Library:
    if request.param == "jax":
        request.getfixturevalue("jax_x64")
        return jax_library()
    return torch_library()


@contextlib.contextmanager
def no_numpy_copies(lib: Library) -> Iterator[None]:
    """While inside, any way of copying ``lib``'s arrays to NumPy or to Python numbers
    raises: nlref's ``to_numpy`` (wherever it was imported), NumPy's converters given
    such an array, and the arrays' own ``__array__``, ``__dlpack__``, ``numpy``, ``item``,
    ``tolist`` and ``__float__``."""

    def refuse(what: str) -> Callable[..., Any]:
        def refused(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"{what} was called on the {lib.name} path")

        return refused

    def guarded(name: str, convert: Callable[..., Any]) -> Callable[..., Any]:
        def converter(*args: Any, **kwargs: Any) -> Any:
            if any(isinstance(a, lib.array_types) for a in args):
                raise AssertionError(f"numpy.{name} was given a {lib.name} array")
            return convert(*args, **kwargs)

        return converter

    original = nlref._backend.to_numpy
    with pytest.MonkeyPatch.context() as mp:
        for module in [m for name, m in sys.modules.items() if name.startswith("nlref")]:
            if getattr(module, "to_numpy", None) is original:
                mp.setattr(module, "to_numpy", refuse(f"{module.__name__}.to_numpy"))
        for name in ["asarray", "array", "asanyarray", "ascontiguousarray", "from_dlpack"]:
            mp.setattr(np, name, guarded(name, getattr(np, name)))
        for cls in lib.array_types:
            for name in ["__array__", "__dlpack__", "numpy", "item", "tolist", "__float__"]:
                if hasattr(cls, name):
                    mp.setattr(cls, name, refuse(f"{cls.__name__}.{name}"))
        yield


def block_outputs(z: Any, cache: Any, dx: Any, grads: dict[str, Any]) -> dict[str, Any]:
    """Every output by name: z, dx, the gradients, the new BN buffers, the attention (when
    stored), rows of it, and g."""
    out = {"z": z, "dx": dx, **{f"grad {n}": g for n, g in grads.items()}}
    out.update(cache.updated_buffers)
    if isinstance(cache, nlref.BlockCache):
        out["attention"] = cache.attention
    out["attention_rows"] = cache.attention_rows(*ROWS)
    out["values"] = cache.values
    return out


def run_block(x: Any, params: dict, dz: Any, case: grid.Case, **kw: Any) -> dict[str, Any]:
    """Forward and backward; every output by name, in the library of x."""
    z, cache = nlref.forward(x, params, case.cfg, training=case.training, **kw)
    dx, grads = nlref.backward(dz, cache)
    assert list(grads) == list(nlref.trainable_names(case.cfg))
    grid.assert_path(cache, kw.get("chunk_size"))
    return block_outputs(z, cache, dx, grads)


_NUMPY: dict[str, dict[str, np.ndarray]] = {}


def numpy_result(case: grid.Case) -> dict[str, np.ndarray]:
    """NumPy's results for ``case`` (the reference path), computed once."""
    if case.id not in _NUMPY:
        x, params, dz = case.draw()
        _NUMPY[case.id] = run_block(x, params, dz, case)
    return _NUMPY[case.id]


def is_gradient(name: str) -> bool:
    return name == "dx" or name.startswith("grad ")


def assert_agrees(
    got: dict[str, Any], want: dict[str, np.ndarray], lib: Library, like: Any
) -> None:
    """Of ``lib``, on ``like``'s device, float64; equal to ``want`` to 1e-12 of the
    tensor's largest entry (of the largest gradient entry for the gradients)."""
    assert list(got) == list(want)
    scale = grid.scales(want, filter(is_gradient, want))
    for name, value in got.items():
        assert lib.is_array(value), f"{name} is a {type(value).__name__}"
        assert lib.device(value) == lib.device(like), name
        assert value.dtype == like.dtype, name
        host = nlref.to_numpy(value)
        assert host.shape == want[name].shape, name
        error = float(np.max(np.abs(host - want[name])))
        assert error <= 1e-12 * scale[name], f"{name}: max |error| {error:.2e} ({scale[name]:.1e})"


def to_library(lib: Library, x: Any, params: dict, dz: Any) -> tuple[Any, dict, Any]:
    return lib.asarray(x), {k: lib.asarray(v) for k, v in params.items()}, lib.asarray(dz)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_core_matrix_agrees_with_numpy(case: grid.Case, lib: Library) -> None:
    """The reference path and the engine's tiles, on ``lib``, agree with NumPy."""
    want = numpy_result(case)
    x, params, dz = to_library(lib, *case.draw())
    with no_numpy_copies(lib):
        reference = run_block(x, params, dz, case)
        tiled = run_block(x, params, dz, case, chunk_size=CHUNK, threads=None)
    assert_agrees(reference, want, lib, x)
    assert_agrees(tiled, {k: v for k, v in want.items() if k != "attention"}, lib, x)


def test_the_guard_catches_copies(lib: Library) -> None:
    """The guard of the matrix does catch a copy to NumPy, by each way out."""
    a = lib.asarray(np.ones((2, 3)))
    with no_numpy_copies(lib):
        for copy in [nlref.to_numpy, np.asarray, np.array, np.from_dlpack, float]:
            with pytest.raises(AssertionError, match=r"called on the|was given a"):
                copy(a[0, 0] if copy is float else a)
        assert lib.is_array(a * 2.0 + 1.0)  # arithmetic is not a copy
    np.testing.assert_array_equal(nlref.to_numpy(a), np.ones((2, 3)))


def test_threads_refused(lib: Library) -> None:
    """threads > 1 is for NumPy-backed arrays; None is one thread even far above the
    size where NumPy would use every CPU."""
    case = CASES[0]
    x, params, _ = to_library(lib, *case.draw())
    library = {"torch": "PyTorch", "jax": "JAX"}[lib.name]
    for threads in (2, 3):
        message = rf"threads={threads} is for NumPy and array-api-strict arrays; {library} arrays"
        with pytest.raises(ValueError, match=message):
            nlref.forward(x, params, case.cfg, training=case.training, threads=threads)
    big = lib.asarray(np.zeros((1, grid.C, 300, 300)))  # B·N·N′ = 8.1e9 attention elements
    assert engine.plan(big, case.cfg).threads == 1
    assert engine.plan(big, case.cfg, threads=1).threads == 1


@pytest.mark.parametrize("chunk_size", [None, CHUNK], ids=["reference", "tiled"])
def test_jax_traces_the_whole_block(
    chunk_size: int | None, jax_x64: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """jax.jit traces forward and backward, reference and tiles: every step is an array
    operation (a traced array has no values for NumPy or Python to read). Only the memory
    plan asks where x lives, which a traced array cannot say."""
    jax = jax_x64
    case = next(c for c in CASES if c.id == "embedded_gaussian-2d-pool_after-bn_train-bias")
    want = numpy_result(case)
    x, params, dz = to_library(jax_library(), *case.draw())
    monkeypatch.setattr(engine.memory, "available_memory", lambda a: None)

    def block(x: Any, params: dict, dz: Any) -> tuple[Any, ...]:
        z, cache = nlref.forward(x, params, case.cfg, training=case.training, chunk_size=chunk_size)
        grid.assert_path(cache, chunk_size)
        dx, grads = nlref.backward(dz, cache)
        return z, dx, grads

    z, dx, grads = jax.jit(block)(x, params, dz)
    assert set(grads) == set(nlref.trainable_names(case.cfg))
    scale = grid.scales(want, filter(is_gradient, want))
    for name, value in [("z", z), ("dx", dx), *((f"grad {n}", g) for n, g in grads.items())]:
        assert array_api_compat.is_jax_array(value), name
        np.testing.assert_allclose(
            np.asarray(value), want[name], rtol=0, atol=1e-12 * scale[name], err_msg=name
        )


@pytest.mark.gpu
def test_cuda_tensors_stay_on_the_device() -> None:
    require("torch.cuda")
    lib = torch_library("cuda")
    for case in [c for c in CASES if c.cfg.sub_sample is not None][::9]:
        want = numpy_result(case)
        x, params, dz = to_library(lib, *case.draw())
        with no_numpy_copies(lib):
            reference = run_block(x, params, dz, case)
            tiled = run_block(x, params, dz, case, chunk_size=CHUNK)
        assert_agrees(reference, want, lib, x)
        assert_agrees(tiled, {k: v for k, v in want.items() if k != "attention"}, lib, x)
