"""The cost model of docs/performance.md: :func:`nlref.engine.cost.gemm_flops`.

The model is checked against the matrix products nlref actually runs (counted by wrapping
``matmul`` of the NumPy namespace), for every variant, pool order and the reference,
tiled and threaded paths, so that the FLOP table in the docs and the ``%sgemm`` column of
``nlref bench`` cannot drift from the code. What a variant costs comes from its own
declaration (``pair_flops``, ``has_logits``): ``tests/test_variant_plugin.py`` shows it for
a variant the model has never seen.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import array_api_compat.numpy as compat_numpy
import numpy as np
import pytest

import nlref
from nlref.engine import cost

from . import grid

B, C, C_INTER = 2, 6, 4
SPATIAL, KERNEL = (6, 8), (2, 2)


def count_gemm_flops(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Wrap the NumPy namespace's matmul; count 2·M·K·N per product of two matrices (from
    every thread)."""
    counted: list[int] = []
    lock = threading.Lock()
    matmul = compat_numpy.matmul

    def counting(a: Any, b: Any) -> Any:
        out = matmul(a, b)
        # a (.., M, K) @ b (.., K, N); matrix-vector products (the concatenation's
        # w_θᵀθ and its gradient) are O(N) and not counted, as in the model
        if a.ndim >= 2 and b.ndim >= 2 and a.shape[-2] > 1 and b.shape[-1] > 1:
            batch = math.prod(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
            with lock:
                counted.append(2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1])
        return out

    monkeypatch.setattr(compat_numpy, "matmul", counting)
    return counted


def assert_model_counts_the_products(
    cfg: nlref.NonLocalConfig,
    x: Any,
    params: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    **kw: Any,
) -> dict[str, int]:
    """Run forward and backward with ``kw`` (``chunk_size`` below N: tiles); the model's
    forward, backward and recompute FLOPs must be the products counted. Returns the
    model."""
    counted = count_gemm_flops(monkeypatch)
    z, cache = nlref.forward(x, params, cfg, **kw)
    forward_flops = sum(counted)
    nlref.backward(np.ones_like(z), cache)
    total = sum(counted)
    tiled = kw.get("chunk_size") is not None
    grid.assert_path(cache, kw.get("chunk_size"), kw.get("threads") or 1)
    model = cost.gemm_flops(cfg, tuple(x.shape), chunked=tiled)
    assert forward_flops == model["forward"]
    assert total == model["total"] == model["forward"] + model["backward"] + model["recompute"]
    variant = nlref.pairwise.get(cfg.pairwise)
    if tiled and variant.has_logits:
        assert model["recompute"] == x.shape[0] * math.prod(x.shape[2:]) * math.prod(
            cfg.key_shape(x.shape[2:])
        ) * variant.pair_flops(cfg.inter_channels if variant.embeds else x.shape[1])
    else:
        assert model["recompute"] == 0
    return model


@pytest.mark.parametrize(
    ("chunk_size", "threads"),
    [(None, 1), (5, 1), (None, 2), (5, 2)],
    ids=["reference", "tiled", "threaded", "tiled_threaded"],
)
@pytest.mark.parametrize("sub", ["off", "after_projection", "before_projection"])
@pytest.mark.parametrize("pairwise", grid.VARIANTS)
def test_gemm_flops_match_the_products_nlref_runs(
    pairwise: str, sub: str, chunk_size: int | None, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = nlref.NonLocalConfig(
        in_channels=C,
        inter_channels=C_INTER,
        pairwise=pairwise,
        sub_sample=None if sub == "off" else KERNEL,
        pool_order="after_projection" if sub == "off" else sub,
    )
    params = nlref.init_params(cfg, rng=0, scheme="random")
    x = np.random.default_rng(1).standard_normal((B, C, *SPATIAL))
    assert_model_counts_the_products(
        cfg, x, params, monkeypatch, chunk_size=chunk_size, threads=threads
    )


def test_gemm_flops_read_the_declaration(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model reads a variant's pair_flops and has_logits, never its name: the same
    variant declared otherwise costs otherwise."""
    cfg = nlref.NonLocalConfig(in_channels=C, inter_channels=C_INTER, pairwise="dot_product")
    shape = (B, C, *SPATIAL)
    n = math.prod(SPATIAL)
    real = nlref.pairwise.get("dot_product")
    before = cost.gemm_flops(cfg, shape, chunked=True)
    declared = nlref.pairwise.Pairwise(
        **{
            **{f: getattr(real, f) for f in real.__dataclass_fields__},
            "pair_flops": lambda channels: 2 * channels + 1000,
            "has_logits": False,
        }
    )
    monkeypatch.setattr(cost, "get_pairwise", lambda name: declared)
    after = cost.gemm_flops(cfg, shape, chunked=True)
    assert after["forward"] - before["forward"] == B * n * n * 1000
    assert before["recompute"] == B * n * n * 2 * C_INTER and after["recompute"] == 0
