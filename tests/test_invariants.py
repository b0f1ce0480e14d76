"""Invariants asserted for every variant, pool setting, norm mode and dtype, on every backend.

- Reruns are bit-identical: two forwards of the same inputs, and two backwards of the same
  upstream gradient, give the same bits (z, attention, running statistics, dx, every
  gradient).
- Nothing the caller passed is mutated: x, every parameter and dz keep their values (on
  NumPy they are also made read-only, so an in-place write would raise), the params dict
  keeps its keys and its arrays, and no output shares memory with an input (writing into z
  or a gradient cannot corrupt x or the params).
- The batch is independent in eval mode: sample i of a batch gives the z, attention and dx
  of a run on sample i alone, and the parameter gradients of the batch are the sum of the
  per-sample ones. In training mode batch norm couples the samples, and the test checks
  that it does.
"""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np
import pytest

import nlref

from . import grid
from .grid import DTYPES, NORMS, SUB_SAMPLES, VARIANTS, host

B = 3  # three samples: the batch-independence check compares each with the others
SHAPE = grid.shape(2, batch=B)


def setup(
    pairwise: str, sub: str, norm: str | None, dtype: str, xp: Any, seed: int = 0
) -> tuple[nlref.NonLocalConfig, Any, dict[str, Any], Any]:
    cfg = grid.config(pairwise, 2, sub, norm)
    gen = np.random.default_rng(seed)
    params, x = nlref.draw_smooth_case(cfg, SHAPE, rng=gen, xp=xp, dtype=dtype)
    dz = xp.asarray(gen.standard_normal(SHAPE), dtype=getattr(xp, dtype))
    return cfg, x, params, dz


def outputs(x: Any, params: dict[str, Any], cfg: Any, training: bool, dz: Any) -> dict[str, Any]:
    z, cache = nlref.forward(x, params, cfg, training=training)
    dx, grads = nlref.backward(dz, cache)
    return {"z": z, "attention": cache.attention, "dx": dx, **grads, **cache.updated_buffers}


CASES = [
    pytest.param(p, s, n, d, id=f"{p}-{s}-{n}-{d}")
    for p in VARIANTS
    for s in SUB_SAMPLES
    for n in NORMS
    for d in DTYPES
]


@pytest.mark.parametrize(("pairwise", "sub", "norm_id", "dtype"), CASES)
def test_reruns_are_bit_identical(pairwise: str, sub: str, norm_id: str, dtype: str, xp: Any):
    norm, training = NORMS[norm_id]
    cfg, x, params, dz = setup(pairwise, sub, norm, dtype, xp)
    first = outputs(x, params, cfg, training, dz)
    second = outputs(x, params, cfg, training, dz)
    z, cache = nlref.forward(x, params, cfg, training=training)
    backward_twice = [nlref.backward(dz, cache) for _ in range(2)]
    assert list(first) == list(second)
    for name in first:
        np.testing.assert_array_equal(host(first[name]), host(second[name]), err_msg=name)
    np.testing.assert_array_equal(host(z), host(first["z"]))
    (dx1, g1), (dx2, g2) = backward_twice
    np.testing.assert_array_equal(host(dx1), host(dx2))
    for name in g1:
        np.testing.assert_array_equal(host(g1[name]), host(g2[name]), err_msg=name)


@pytest.mark.parametrize(("pairwise", "sub", "norm_id", "dtype"), CASES)
def test_nothing_passed_is_mutated(pairwise: str, sub: str, norm_id: str, dtype: str, xp: Any):
    norm, training = NORMS[norm_id]
    cfg, x, params, dz = setup(pairwise, sub, norm, dtype, xp)
    if array_api_compat.is_numpy_namespace(xp):  # an in-place write into any input now raises
        for a in [x, dz, *params.values()]:
            a.flags.writeable = False
    before = {"x": host(x), "dz": host(dz), **{n: host(v) for n, v in params.items()}}
    arrays_before = dict(params)

    out = outputs(x, params, cfg, training, dz)
    updated = nlref.apply_buffer_updates(params, nlref.forward(x, params, cfg, training)[1])

    after = {"x": host(x), "dz": host(dz), **{n: host(v) for n, v in params.items()}}
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)
    assert list(params) == list(arrays_before)
    assert all(params[n] is arrays_before[n] for n in params)
    assert updated is not params
    if array_api_compat.is_numpy_namespace(xp):
        for out_name, value in out.items():
            for in_name, array in [("x", x), ("dz", dz), *params.items()]:
                assert not np.shares_memory(value, array), f"{out_name} aliases {in_name}"


@pytest.mark.parametrize(("pairwise", "sub", "norm_id", "dtype"), CASES)
def test_batch_independence(pairwise: str, sub: str, norm_id: str, dtype: str, xp: Any):
    norm, training = NORMS[norm_id]
    cfg, x, params, dz = setup(pairwise, sub, norm, dtype, xp)
    batch = {k: host(v) for k, v in outputs(x, params, cfg, training, dz).items()}
    solo = [
        {
            k: host(v)
            for k, v in outputs(
                x[i : i + 1, ...], params, cfg, training, dz[i : i + 1, ...]
            ).items()
        }
        for i in range(B)
    ]
    rtol = 1e-12 if dtype == "float64" else 2e-5
    # a gradient that is 0 by structure (φ's bias under a softmax) is rounding noise in both
    # runs: gradients are compared relative to the largest gradient entry
    grad_scale = max(float(np.max(np.abs(batch[n]))) for n in ["dx", *nlref.trainable_names(cfg)])

    def close(got: np.ndarray, want: np.ndarray, name: str) -> None:
        scale = float(np.max(np.abs(want)))
        if name not in ("z", "attention"):
            scale = grad_scale
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=name)

    if norm == "batchnorm" and training:
        # batch statistics couple the samples: sample 0 alone is normalised differently
        assert not np.allclose(batch["z"][0], solo[0]["z"][0], rtol=1e-3, atol=1e-3)
        return
    for i in range(B):
        for name in ("z", "attention", "dx"):
            close(batch[name][i], solo[i][name][0], name)
    for name in nlref.trainable_names(cfg):  # parameters are shared: gradients add up
        close(batch[name], sum(s[name] for s in solo), name)
