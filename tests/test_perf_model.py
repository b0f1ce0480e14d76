"""The cost model of docs/performance.md: GEMM FLOPs and the attention plan.

``nlref.perf.gemm_flops`` is checked against the matrix products nlref actually runs
(counted by wrapping ``matmul`` of the NumPy namespace), for every variant, pool order and
both evaluation paths, so that the FLOP table in the docs and the ``%sgemm`` column of
``nlref bench`` cannot drift from the code.
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat.numpy as compat_numpy
import numpy as np
import pytest

import nlref
from nlref import perf

B, C, C_INTER = 2, 6, 4
SPATIAL, KERNEL = (6, 8), (2, 2)


def count_gemm_flops(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Wrap the NumPy namespace's matmul; count 2·M·K·N per product of two matrices."""
    counted: list[int] = []
    matmul = compat_numpy.matmul

    def counting(a: Any, b: Any) -> Any:
        out = matmul(a, b)
        # a (.., M, K) @ b (.., K, N); matrix-vector products (the concatenation's
        # w_θᵀθ and its gradient) are O(N) and not counted, as in the model
        if a.ndim >= 2 and b.ndim >= 2 and a.shape[-2] > 1 and b.shape[-1] > 1:
            batch = math.prod(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
            counted.append(2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1])
        return out

    monkeypatch.setattr(compat_numpy, "matmul", counting)
    return counted


@pytest.mark.parametrize("chunk_size", [None, 5])
@pytest.mark.parametrize("sub", ["off", "after_projection", "before_projection"])
@pytest.mark.parametrize("pairwise", nlref.pairwise.names())
def test_gemm_flops_match_the_products_nlref_runs(
    pairwise: str, sub: str, chunk_size: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = nlref.NonLocalConfig(
        in_channels=C,
        inter_channels=C_INTER,
        pairwise=pairwise,
        sub_sample=None if sub == "off" else KERNEL,
        pool_order="after_projection" if sub == "off" else sub,
    )
    shape = (B, C, *SPATIAL)
    params = nlref.init_params(cfg, rng=0, scheme="random")
    x = np.random.default_rng(1).standard_normal(shape)
    counted = count_gemm_flops(monkeypatch)
    z, cache = nlref.forward(x, params, cfg, chunk_size=chunk_size)
    forward_flops = sum(counted)
    nlref.backward(np.ones_like(z), cache)
    total = sum(counted)

    model = perf.gemm_flops(cfg, shape, chunked=chunk_size is not None)
    assert forward_flops == model["forward"]
    assert total == model["total"] == model["forward"] + model["backward"] + model["recompute"]
    if chunk_size is None or pairwise == "concatenation":
        assert model["recompute"] == 0
    else:
        assert model["recompute"] > 0


def test_plan_materialises_small_and_chunks_large() -> None:
    small = perf.plan_attention((2, 64, 32, 32), 1024, 32, 4)
    assert small.materialised and small.n_chunks == 1
    assert small.attention_bytes == 2 * 1024 * 1024 * 4

    big = perf.plan_attention((1, 64, 128, 128), 16384, 32, 4)
    assert not big.materialised
    assert big.attention_bytes == 2**30 > perf.ATTENTION_MEMORY_LIMIT
    assert big.chunk_size == perf.CHUNK_MEMORY // (16384 * 4)
    assert big.n_chunks == math.ceil(16384 / big.chunk_size)
    # the working set is the O(N) arrays plus a few blocks: far below the attention itself
    assert big.estimated_bytes < 128 * 2**20


def test_plan_respects_an_explicit_chunk_size_and_the_memory() -> None:
    plan = perf.plan_attention((1, 8, 100), 100, 4, 8, chunk_size=30)
    assert (plan.chunk_size, plan.n_chunks) == (30, 4)
    whole = perf.plan_attention((1, 8, 100), 100, 4, 8, chunk_size=100)
    assert whole.materialised
    needed = perf.working_set_bytes(1, 8, 4, 100, 100, 8, 7)
    shrunk = perf.plan_attention((1, 8, 100), 100, 4, 8, available=needed)
    assert shrunk.chunk_size == 7
    with pytest.raises(perf.MemoryLimitError, match="does not fit"):
        perf.plan_attention((1, 8, 100), 100, 4, 8, available=100)


def test_available_memory_is_reported_for_host_arrays() -> None:
    available = perf.available_memory(np.zeros(1))
    assert available is None or available > 0
