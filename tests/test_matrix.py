"""The full test matrix: every configuration, gradient-checked and compared with PyTorch.

Axes (the grid of ``tests/grid.py``): pairwise variant × spatial dims (1D/2D/3D, odd sizes
so that max-pool floors) × sub-sampling (off, or on with either pool order) × norm (batch
norm in training mode, batch norm in eval mode, none) × biases (all, none) × scale (None,
0.5). The concatenation variant refuses a scale, which is tested on its own rather than
dropped silently.

Each case checks, on every array backend of the ``xp`` fixture:

(a) :func:`nlref.gradcheck_block` on x and every trainable parameter;
(b) z, the attention, dx, every gradient and the updated BN running statistics against an
    independent float64 PyTorch autograd implementation (``torch_reference.py``), to 1e-10.

The torch reference depends only on the case (its inputs are drawn from NumPy with a seed
fixed by the case), so it is computed once and shared between backends.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import nlref

from .grid import (
    BIASES,
    C_INTER,
    N_KEYS,
    NORMS,
    SCALES,
    SPATIAL,
    SUB_SAMPLES,
    C,
    Case,
    N,
    matrix,
    uses_scale,
)
from .torch_reference import torch_block

RTOL = ATOL = 1e-10

CASES = matrix(scales=SCALES)


_REFERENCE: dict[str, dict[str, Any]] = {}


def torch_result(case: Case, x: Any, params: dict[str, Any], dz: Any) -> dict[str, Any]:
    """The torch reference for ``case``, computed once and shared by the backends."""
    host_x = nlref.to_numpy(x)
    if case.id not in _REFERENCE:
        ref = torch_block(
            host_x,
            {n: nlref.to_numpy(v) for n, v in params.items()},
            case.cfg,
            training=case.training,
            dz=nlref.to_numpy(dz),
        )
        _REFERENCE[case.id] = {"x": host_x.copy(), **ref}
    ref = _REFERENCE[case.id]
    # the sharing is only valid if every backend drew the same input
    np.testing.assert_array_equal(ref["x"], host_x)
    return ref


def compare_with_torch(case: Case, xp: Any) -> None:
    """Run nlref on ``case`` and assert agreement with torch."""
    x, params, dz = case.draw(xp)
    ref = torch_result(case, x, params, dz)
    z, cache = nlref.forward(x, params, case.cfg, training=case.training)
    dx, grads = nlref.backward(dz, cache)

    got = {"z": z, "attention": cache.attention, "dx": dx}
    want = {"z": ref["z"], "attention": ref["attention"], "dx": ref["dx"]}
    assert list(grads) == list(ref["grads"]) == list(nlref.trainable_names(case.cfg))
    for name in grads:
        got[f"grad {name}"] = grads[name]
        want[f"grad {name}"] = ref["grads"][name]
    assert set(cache.updated_buffers) == (set(ref["buffers"]) if case.training else set())
    for name, value in cache.updated_buffers.items():
        got[name] = value
        want[name] = ref["buffers"][name]

    for key, value in got.items():
        host = nlref.to_numpy(value)
        assert host.dtype == np.float64, key
        assert host.shape == want[key].shape, key
        np.testing.assert_allclose(host, want[key], rtol=RTOL, atol=ATOL, err_msg=key)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_gradcheck(case: Case, xp: Any) -> None:
    x, params, _ = case.draw(xp)
    result = nlref.gradcheck_block(case.cfg, x, params, training=case.training, rng=case.seed)
    assert result.ok  # gradcheck_block raises GradcheckError before this on failure
    assert set(result.args) == {"x", *nlref.trainable_names(case.cfg)}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_torch(case: Case, xp: Any, torch: Any) -> None:
    compare_with_torch(case, xp)


def test_matrix_is_complete() -> None:
    variants = nlref.pairwise.names()
    assert set(variants) == {"gaussian", "embedded_gaussian", "dot_product", "concatenation"}
    per_variant = len(SPATIAL) * len(SUB_SAMPLES) * len(NORMS) * len(BIASES)
    expected = sum(per_variant * (len(SCALES) if uses_scale(v) else 1) for v in variants)
    assert len(CASES) == expected
    assert len({c.id for c in CASES}) == len(CASES)
    # pooling really floors somewhere in every dimensionality, and every dimensionality has
    # the grid's N queries and N′ keys
    for spatial, kernel in SPATIAL.values():
        assert any(s % k for s, k in zip(spatial, kernel, strict=True))
        assert math.prod(spatial) == N
        assert math.prod(nlref.layers.maxpool.output_size(spatial, kernel)) == N_KEYS


@pytest.mark.parametrize("dims", sorted(SPATIAL), ids=lambda d: f"{d}d")
def test_concatenation_refuses_scale(dims: int) -> None:
    assert not uses_scale("concatenation")
    with pytest.raises(ValueError, match="scale"):
        nlref.NonLocalConfig(
            in_channels=C,
            inter_channels=C_INTER,
            pairwise="concatenation",
            scale=0.5,
            sub_sample=SPATIAL[dims][1],
        )
    cfg = nlref.NonLocalConfig(in_channels=C, inter_channels=C_INTER, pairwise="concatenation")
    assert cfg.scale is None and cfg.effective_scale == 1.0
