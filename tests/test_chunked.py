"""Exact memory-bounded evaluation: ``nlref.forward(..., chunk_size=k)``.

The chunked path evaluates the attention in blocks of query rows and recomputes each block
in the backward. Every pairwise function normalises each query row on its own, so the
chunked results must equal the materialised ones up to float rounding, for every variant,
pool order, norm and chunk size (including blocks of 1 row and a ragged last block). The
chunked backward is also gradient-checked on its own in float64, and the automatic switch,
the memory check and ``cache.attention``'s explanation are tested.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

import numpy as np
import pytest

import nlref
from nlref import perf

from . import block_cases
from .block_cases import C_INTER, C, assert_same, run

B = 2
SPATIAL = {1: ((11,), (2,)), 2: ((5, 6), (2, 2)), 3: ((3, 4, 5), (1, 2, 2))}
SUB_SAMPLES = {
    "full": (False, "after_projection"),
    "pool_after": (True, "after_projection"),
    "pool_before": (True, "before_projection"),
}
NORMS = {"bn_train": ("batchnorm", True), "bn_eval": ("batchnorm", False), "no_norm": (None, True)}
VARIANTS = nlref.pairwise.names()


def make_case(
    pairwise: str, dims: int, sub: str, norm: str | None, dtype: str = "float64", xp: Any = None
) -> tuple[nlref.NonLocalConfig, Any, Any, dict[str, Any]]:
    spatial, kernel = SPATIAL[dims]
    pooled, order = SUB_SAMPLES[sub]
    return block_cases.make_case(
        pairwise,
        B,
        spatial,
        kernel if pooled else None,
        order,
        norm,
        seed=f"{pairwise}-{dims}-{sub}-{norm}",
        dtype=dtype,
        xp=xp,
    )


@pytest.mark.parametrize("norm_id", list(NORMS))
@pytest.mark.parametrize("sub", list(SUB_SAMPLES))
@pytest.mark.parametrize("dims", list(SPATIAL))
@pytest.mark.parametrize("pairwise", VARIANTS)
def test_chunked_equals_materialised(pairwise: str, dims: int, sub: str, norm_id: str) -> None:
    """Every variant x 1D/2D/3D x pooling x norm, chunk sizes 1, 4 (ragged), N - 1."""
    norm, training = NORMS[norm_id]
    cfg, x, dz, params = make_case(pairwise, dims, sub, norm)
    n = int(np.prod(x.shape[2:]))
    full = run(x, dz, params, cfg, training, chunk_size=n)
    assert full["cache"].plan.materialised
    assert full["cache"].attention.shape[:2] == (B, n)
    for chunk in (1, 4, n - 1):
        chunked = run(x, dz, params, cfg, training, chunk_size=chunk)
        plan = chunked["cache"].plan
        assert not plan.materialised
        assert (plan.chunk_size, plan.n_chunks) == (chunk, -(-n // chunk))
        assert not chunked["cache"].plan.materialised
        assert_same(chunked, full, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("pairwise", VARIANTS)
def test_chunked_equals_materialised_float32(pairwise: str) -> None:
    """float32 stays float32 on both paths (no silent upcast) and they agree to rounding."""
    cfg, x, dz, params = make_case(pairwise, 2, "pool_after", "batchnorm", dtype="float32")
    full = run(x, dz, params, cfg, True, chunk_size=10**6)
    chunked = run(x, dz, params, cfg, True, chunk_size=7)
    for out in (full, chunked):
        for name, value in out.items():
            if name != "cache":
                assert value.dtype == np.float32, f"{name} is {value.dtype}"
    assert_same(chunked, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pairwise", VARIANTS)
def test_chunked_on_every_backend(pairwise: str, xp: Any) -> None:
    """The chunked path uses only the array API (array-api-strict, CuPy where present)."""
    cfg, x, dz, params = make_case(pairwise, 2, "pool_before", "batchnorm", xp=xp)
    full = run(x, dz, params, cfg, True)
    chunked = run(x, dz, params, cfg, True, chunk_size=3)
    assert_same(chunked, full, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("sub", list(SUB_SAMPLES))
@pytest.mark.parametrize("pairwise", VARIANTS)
def test_chunked_gradcheck(pairwise: str, sub: str) -> None:
    """Central differences in float64 through the chunked forward and backward."""
    cfg, x, _, params = make_case(pairwise, 2, sub, "batchnorm")
    names = list(params)

    def fwd(inp: dict[str, Any]) -> tuple[Any, Any]:
        return nlref.forward(inp["x"], {k: inp[k] for k in names}, cfg, chunk_size=4)

    def bwd(dz: Any, cache: Any) -> dict[str, Any]:
        assert not cache.plan.materialised
        dx, grads = nlref.backward(dz, cache)
        return {"x": dx, **grads}

    wrt = ["x", *nlref.trainable_names(cfg)]
    result = nlref.gradcheck(fwd, bwd, {"x": x, **params}, wrt=wrt)
    assert result.ok, str(result)


@pytest.mark.parametrize("chunk_size", [None, 5])
@pytest.mark.parametrize("pairwise", VARIANTS)
def test_nothing_mutated_and_backward_repeatable(pairwise: str, chunk_size: int | None) -> None:
    """In-place updates touch only arrays nlref made: x, params, dz and the cache survive."""
    cfg, x, dz, params = make_case(pairwise, 2, "pool_after", "batchnorm")
    saved = {"x": x.copy(), "dz": dz.copy(), **{k: v.copy() for k, v in params.items()}}
    z, cache = nlref.forward(x, params, cfg, chunk_size=chunk_size)
    z_copy = z.copy()
    first = nlref.backward(dz, cache)
    second = nlref.backward(dz, cache)
    np.testing.assert_array_equal(first[0], second[0])
    for name in first[1]:
        np.testing.assert_array_equal(first[1][name], second[1][name], err_msg=name)
    np.testing.assert_array_equal(z, z_copy)
    np.testing.assert_array_equal(x, saved["x"])
    np.testing.assert_array_equal(dz, saved["dz"])
    for name, value in params.items():
        np.testing.assert_array_equal(value, saved[name], err_msg=name)


def test_layers_leave_their_inputs_alone_by_default() -> None:
    """softmax and the variants modify an input only when it is handed over explicitly."""
    rng = np.random.default_rng(0)
    s = rng.standard_normal((2, 5, 7))
    s_copy = s.copy()
    p, cache = nlref.layers.softmax.forward(s)
    np.testing.assert_array_equal(s, s_copy)
    dp = rng.standard_normal(p.shape)
    dp_copy = dp.copy()
    ds = nlref.layers.softmax.backward(dp, cache)
    np.testing.assert_array_equal(dp, dp_copy)
    # handed over: same numbers, computed in the given memory
    ds_inplace = nlref.layers.softmax.backward(dp, cache, overwrite_input=True)
    np.testing.assert_allclose(ds_inplace, ds, rtol=1e-15, atol=0)
    p_inplace, _ = nlref.layers.softmax.forward(s_copy.copy(), overwrite_input=True)
    np.testing.assert_allclose(p_inplace, p, rtol=1e-15, atol=0)


# --- automatic chunking and cache.attention ---------------------------------------------


def test_automatic_chunking_above_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, x, dz, params = make_case("embedded_gaussian", 2, "full", "batchnorm")
    n = int(np.prod(x.shape[2:]))
    attention_bytes = B * n * n * 8
    full = run(x, dz, params, cfg, True)
    assert full["cache"].plan.materialised  # far below the default limit
    assert "ATTENTION_MEMORY_LIMIT" in full["cache"].plan.reason

    monkeypatch.setattr(perf, "ATTENTION_MEMORY_LIMIT", attention_bytes - 1)
    monkeypatch.setattr(perf, "CHUNK_MEMORY", B * n * 8 * 4)  # blocks of 4 rows
    auto = run(x, dz, params, cfg, True)
    plan = auto["cache"].plan
    assert (plan.chunk_size, plan.n_chunks) == (4, -(-n // 4))
    assert plan.reason.startswith("chunked automatically")
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
    with pytest.raises(ValueError, match="start < stop"):
        auto["cache"].attention_rows(5, 5)


def test_memory_limit_shrinks_the_automatic_chunks() -> None:
    cfg, x, dz, params = make_case("dot_product", 2, "full", "batchnorm")
    n = int(np.prod(x.shape[2:]))
    needed = perf.working_set_bytes(B, C, C_INTER, n, n, 8, 2)
    out = run(x, dz, params, cfg, True, memory_limit=needed)
    assert out["cache"].plan.chunk_size == 2
    assert_same(out, run(x, dz, params, cfg, True), rtol=1e-12, atol=1e-13)


def test_error_before_any_allocation_when_nothing_fits() -> None:
    """A huge x (a broadcast view: no memory behind it) is refused before anything is made."""
    cfg = nlref.NonLocalConfig(in_channels=C, inter_channels=C_INTER)
    params = nlref.init_params(cfg, dtype="float32")
    x = np.broadcast_to(np.float32(1.0), (1, C, 2**20, 2**20))  # N = 2^40 positions
    tracemalloc.start()
    try:
        with pytest.raises(nlref.MemoryLimitError, match="even in chunks of one query"):
            nlref.forward(x, params, cfg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"forward allocated {peak} bytes before refusing"
    assert issubclass(nlref.MemoryLimitError, MemoryError)


def test_error_when_the_given_chunk_size_does_not_fit() -> None:
    cfg, x, _, params = make_case("embedded_gaussian", 2, "full", "batchnorm")
    n = int(np.prod(x.shape[2:]))
    limit = perf.working_set_bytes(B, C, C_INTER, n, n, 8, 3)
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
    cfg, x, _, params = make_case("dot_product", 1, "full", None)
    with pytest.raises(error, match="chunk_size must be None or an int >= 1"):
        nlref.forward(x, params, cfg, chunk_size=chunk_size)


@pytest.mark.parametrize("limit", [0, -1, True])
def test_bad_memory_limit(limit: Any) -> None:
    cfg, x, _, params = make_case("dot_product", 1, "full", None)
    with pytest.raises(ValueError, match="memory_limit must be None or a positive int"):
        nlref.forward(x, params, cfg, memory_limit=limit)
