"""The engine's memory plan: :func:`nlref.engine.plan` and what ``nlref.forward`` does
with it.

- with ``chunk_size=None`` the attention is materialised while it is small (host arrays:
  at most ``ATTENTION_MEMORY_LIMIT``) and fits; above, the queries run in tiles of about
  ``CHUNK_MEMORY`` bytes; a ``memory_limit`` shrinks the tiles; when even one query per
  tile would not fit, :class:`nlref.MemoryLimitError` is raised before anything is
  allocated;
- a tiled cache explains itself (:class:`nlref.AttentionNotStoredError`) and gives rows
  with ``attention_rows``;
- on a GPU the plan knows the device: whatever fits in its free memory is materialised,
  however far above the host limit, and tiles are of about ``CHUNK_MEMORY_GPU`` bytes;
- with threads, a plan that fits only one tile at a time runs on fewer threads;
- bad ``chunk_size`` and ``memory_limit`` are refused.
"""

from __future__ import annotations

import math
import sys
import tracemalloc
from typing import Any

import array_api_compat
import numpy as np
import pytest

import nlref
from nlref import engine
from nlref.engine import memory

from . import grid
from .conftest import require
from .grid import C_INTER, C, N, assert_same, run

B = grid.B


# --- automatic tiles and cache.attention ----------------------------------------------------


def test_automatic_tiles_above_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, x, dz, params = grid.make_case("embedded_gaussian", 2, "full")
    attention_bytes = B * N * N * 8
    plan = engine.plan(x, cfg)
    assert plan.materialised and not plan.uses_engine  # far below the default limit
    assert "<= ATTENTION_MEMORY_LIMIT" in plan.reason
    assert plan.attention_bytes == attention_bytes
    full = run(x, dz, params, cfg, True)
    assert isinstance(full["cache"], nlref.BlockCache)

    monkeypatch.setattr(memory, "ATTENTION_MEMORY_LIMIT", attention_bytes - 1)
    monkeypatch.setattr(memory, "CHUNK_MEMORY", B * N * 8 * 4)  # tiles of 4 rows
    auto = run(x, dz, params, cfg, True)
    plan = auto["cache"].plan
    assert (plan.chunk_size, plan.n_tiles) == (4, -(-N // 4))
    assert plan.reason.startswith("tiled automatically")
    assert "ATTENTION_MEMORY_LIMIT" in plan.reason
    assert_same(auto, full, rtol=1e-12, atol=1e-13)

    # cache.attention explains itself, and says how to get the rows
    with pytest.raises(nlref.AttentionNotStoredError, match=r"not materialised.*attention_rows"):
        _ = auto["cache"].attention
    assert not hasattr(auto["cache"], "attention")  # an AttributeError
    np.testing.assert_allclose(
        nlref.to_numpy(auto["cache"].attention_rows(3, 11)),
        nlref.to_numpy(full["cache"].attention)[:, 3:11],
        rtol=1e-13,
        atol=1e-15,
    )
    np.testing.assert_array_equal(
        nlref.to_numpy(full["cache"].attention_rows(3, 11)),
        nlref.to_numpy(full["cache"].attention)[:, 3:11],
    )
    for cache in (auto["cache"], full["cache"]):
        with pytest.raises(ValueError, match="start < stop"):
            cache.attention_rows(5, 5)
        with pytest.raises(ValueError, match="start < stop"):
            cache.attention_rows(0, N + 1)


def test_attention_not_stored_message() -> None:
    """The message names the shape, the tiles and why, and both ways to get the attention."""
    cfg, x, _, params = grid.make_case("dot_product", 2, "pool_after")
    _, cache = nlref.forward(x, params, cfg, chunk_size=7)
    with pytest.raises(nlref.AttentionNotStoredError) as err:
        _ = cache.attention
    message = str(err.value)
    assert f"(B, N, N′) = ({B}, {N}, {grid.N_KEYS})" in message
    assert "in 5 tiles of 7 (chunk_size=7 given)" in message
    assert "cache.attention_rows(start, stop)" in message
    assert f"forward(..., chunk_size={N})" in message
    assert issubclass(nlref.AttentionNotStoredError, AttributeError)


def test_memory_limit_shrinks_the_automatic_tiles() -> None:
    cfg, x, dz, params = grid.make_case("dot_product", 2, "full")
    needed = memory.working_set_bytes(B, C, C_INTER, N, N, 8, 2)
    out = run(x, dz, params, cfg, True, memory_limit=needed)
    assert out["cache"].plan.chunk_size == 2
    assert out["cache"].plan.available_bytes == needed
    assert_same(out, run(x, dz, params, cfg, True), rtol=1e-12, atol=1e-13)


def test_error_before_any_allocation_when_nothing_fits() -> None:
    """A huge x (a broadcast view: no memory behind it) is refused before anything is made."""
    cfg = nlref.NonLocalConfig(in_channels=C, inter_channels=C_INTER)
    params = nlref.init_params(cfg, dtype="float32")
    x = np.broadcast_to(np.float32(1.0), (1, C, 2**20, 2**20))  # N = 2^40 positions
    tracemalloc.start()
    try:
        with pytest.raises(nlref.MemoryLimitError, match="even in tiles of one query"):
            nlref.forward(x, params, cfg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"forward allocated {peak} bytes before refusing"
    assert issubclass(nlref.MemoryLimitError, MemoryError)


def test_error_when_the_given_chunk_size_does_not_fit() -> None:
    cfg, x, _, params = grid.make_case("embedded_gaussian", 2, "full")
    limit = memory.working_set_bytes(B, C, C_INTER, N, N, 8, 3)
    with pytest.raises(nlref.MemoryLimitError, match="smaller chunk_size"):
        nlref.forward(x, params, cfg, chunk_size=20, memory_limit=limit)
    with pytest.raises(nlref.MemoryLimitError, match="even chunk_size=1 would not fit"):
        nlref.forward(x, params, cfg, chunk_size=20, memory_limit=1000)
    _, cache = nlref.forward(x, params, cfg, chunk_size=3, memory_limit=limit)
    assert cache.plan.chunk_size == 3


@pytest.mark.parametrize(
    ("chunk_size", "error"),
    [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)],
)
def test_bad_chunk_size(chunk_size: Any, error: type) -> None:
    cfg, x, _, params = grid.make_case("dot_product", 1, "full", None)
    with pytest.raises(error, match="chunk_size must be None or an int >= 1"):
        nlref.forward(x, params, cfg, chunk_size=chunk_size)


@pytest.mark.parametrize(
    ("limit", "error"), [(0, ValueError), (-1, ValueError), (True, TypeError), (2.5, TypeError)]
)
def test_bad_memory_limit(limit: Any, error: type) -> None:
    cfg, x, _, params = grid.make_case("dot_product", 1, "full", None)
    with pytest.raises(error, match="memory_limit must be None or a positive int"):
        nlref.forward(x, params, cfg, memory_limit=limit)


# --- with threads: fewer tiles at a time before giving up -----------------------------------


def test_memory_fallback_records_fewer_threads() -> None:
    """When only one tile at a time fits, the plan falls back to one: cache.threads says."""
    cfg, x, dz, params = grid.make_case("dot_product", 2, "full", batch=1)
    dims = (1, C, C_INTER, N, N, 8)
    limit = memory.working_set_bytes(*dims, 1, 1)  # one row, one tile at a time
    assert memory.working_set_bytes(*dims, 1, 2) > limit
    out = run(x, dz, params, cfg, True, threads=2, memory_limit=limit)
    cache = out["cache"]
    assert cache.plan.concurrent == 1 and cache.plan.chunk_size == 1
    assert cache.threads == 1
    assert_same(out, run(x, dz, params, cfg, True, threads=1), rtol=1e-12, atol=1e-13)


def test_memory_fallback_with_a_given_chunk_size() -> None:
    """A given chunk_size that fits one tile at a time but not two runs on one thread
    instead of raising; one that does not fit even alone still raises."""
    cfg, x, dz, params = grid.make_case("embedded_gaussian", 2, "full", batch=1)
    dims = (1, C, C_INTER, N, N, 8)
    limit = memory.working_set_bytes(*dims, 4, 1)
    assert memory.working_set_bytes(*dims, 4, 2) > limit
    out = run(x, dz, params, cfg, True, threads=2, chunk_size=4, memory_limit=limit)
    assert out["cache"].plan.concurrent == 1 and out["cache"].plan.chunk_size == 4
    assert out["cache"].threads == 1
    one = run(x, dz, params, cfg, True, threads=1, chunk_size=4)
    assert_same(out, one, rtol=1e-12, atol=1e-13)
    with pytest.raises(nlref.MemoryLimitError, match="chunk_size=8"):
        nlref.forward(x, params, cfg, threads=2, chunk_size=8, memory_limit=limit)


# --- plan_tiles ---------------------------------------------------------------------------


def test_plan_materialises_small_and_tiles_large() -> None:
    small = memory.plan_tiles((2, 64, 32, 32), 1024, 32, 4)
    assert small.chunk_size is None and small.n_tiles == 1
    assert small.attention_bytes == 2 * 1024 * 1024 * 4

    big = memory.plan_tiles((1, 64, 128, 128), 16384, 32, 4)
    assert big.chunk_size is not None
    assert big.attention_bytes == 2**30 > memory.ATTENTION_MEMORY_LIMIT
    assert big.chunk_size == memory.CHUNK_MEMORY // (16384 * 4)
    assert big.n_tiles == math.ceil(16384 / big.chunk_size)
    # the working set is the O(N) arrays plus a few tiles: far below the attention itself
    assert big.estimated_bytes < 128 * 2**20


def test_plan_respects_an_explicit_chunk_size_and_the_memory() -> None:
    plan = memory.plan_tiles((1, 8, 100), 100, 4, 8, chunk_size=30)
    assert (plan.chunk_size, plan.n_tiles) == (30, 4)
    whole = memory.plan_tiles((1, 8, 100), 100, 4, 8, chunk_size=100)
    assert whole.chunk_size is None and whole.n_tiles == 1
    needed = memory.working_set_bytes(1, 8, 4, 100, 100, 8, 7)
    shrunk = memory.plan_tiles((1, 8, 100), 100, 4, 8, available=needed)
    assert shrunk.chunk_size == 7
    with pytest.raises(nlref.MemoryLimitError, match="does not fit"):
        memory.plan_tiles((1, 8, 100), 100, 4, 8, available=100)


# --- the plan knows the device --------------------------------------------------------------


def big_x() -> tuple[nlref.NonLocalConfig, Any]:
    """N = 16,384 positions in float32: the (1, N, N) attention is 1 GiB (a broadcast view:
    nothing behind it; only the plan looks at it)."""
    cfg = nlref.NonLocalConfig(in_channels=64, inter_channels=32)
    return cfg, np.broadcast_to(np.float32(0.0), (1, 64, 128, 128))


def pretend_device(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    """Every array is a device array with ``free`` bytes of free memory."""
    monkeypatch.setattr(memory, "is_device_array", lambda a: True)
    monkeypatch.setattr(memory, "available_memory", lambda a: free)


def test_device_arrays_materialise_whatever_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host limit tiles a 1 GiB attention; a device with 80 GiB free holds it, one
    with 2 GiB free runs it in tiles of about CHUNK_MEMORY_GPU."""
    cfg, x = big_x()
    host = engine.plan(x, cfg, threads=1)
    assert host.attention_bytes == 2**30 > memory.ATTENTION_MEMORY_LIMIT
    assert not host.materialised
    assert host.chunk_size == memory.CHUNK_MEMORY // (16384 * 4)

    pretend_device(monkeypatch, 80 * 2**30)
    device = engine.plan(x, cfg, threads=1)
    assert device.materialised and device.n_tiles == 1
    assert "fits in the device's free memory" in device.reason
    assert device.available_bytes == 80 * 2**30
    assert device.estimated_bytes > memory.ATTENTION_MEMORY_LIMIT

    pretend_device(monkeypatch, 2 * 2**30)
    short = engine.plan(x, cfg, threads=1)
    assert short.chunk_size == memory.CHUNK_MEMORY_GPU // (16384 * 4) == 4096
    assert short.estimated_bytes <= 2 * 2**30
    assert short.reason.startswith("tiled automatically")

    pretend_device(monkeypatch, 2**20)
    with pytest.raises(nlref.MemoryLimitError, match="even in tiles of one query"):
        engine.plan(x, cfg, threads=1)


def test_forward_materialises_a_device_array_above_the_host_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """nlref.forward follows the device plan: an attention above the host limit that fits
    in the device's memory runs the reference path, materialised."""
    cfg, x, _, params = grid.make_case("embedded_gaussian", 2, "full")
    monkeypatch.setattr(memory, "ATTENTION_MEMORY_LIMIT", B * N * N * 8 - 1)
    monkeypatch.setattr(memory, "CHUNK_MEMORY", B * N * 8 * 4)  # tiles of 4 rows
    _, on_host = nlref.forward(x, params, cfg)
    assert isinstance(on_host, engine.EngineCache)
    assert (on_host.plan.materialised, on_host.plan.chunk_size) == (False, 4)

    pretend_device(monkeypatch, 2**30)
    _, on_device = nlref.forward(x, params, cfg)
    assert isinstance(on_device, nlref.BlockCache)
    np.testing.assert_allclose(
        nlref.to_numpy(on_device.attention),
        nlref.to_numpy(on_host.attention_rows(0, N)),
        rtol=1e-12,
        atol=1e-15,
    )


@pytest.mark.parametrize("library", ["numpy", "array_api_strict", "torch", "jax"])
def test_host_arrays_are_not_device_arrays(library: str) -> None:
    host = np.zeros((1, 2, 3), dtype=np.float32)
    if library == "numpy":
        x = host
    elif library == "array_api_strict":
        x = require(library).asarray(host)
    elif library == "torch":
        x = require("torch").from_numpy(host)
    else:
        x = require("jax").numpy.asarray(host)
    assert not memory.is_device_array(x)
    assert memory.chunk_memory(x) == memory.CHUNK_MEMORY
    available = memory.available_memory(x)
    assert available is not None or sys.platform != "linux"  # Linux: /proc/meminfo
    assert available is None or available > 0


@pytest.mark.gpu
def test_cuda_tensors_are_device_arrays() -> None:
    torch = require("torch")
    require("torch.cuda")
    x = torch.zeros((1, 2, 3), device="cuda")
    assert memory.is_device_array(x)
    assert memory.chunk_memory(x) == memory.CHUNK_MEMORY_GPU
    free, _ = torch.cuda.mem_get_info(x.device)
    assert memory.available_memory(x) >= free


@pytest.mark.gpu
def test_cupy_arrays_are_device_arrays() -> None:
    cupy = require("cupy")
    x = cupy.zeros((1, 2, 3))
    assert memory.is_device_array(x)
    assert memory.chunk_memory(x) == memory.CHUNK_MEMORY_GPU
    available = memory.available_memory(x)
    assert available is not None and available > 0
    assert array_api_compat.is_cupy_array(x)
