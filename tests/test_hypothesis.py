"""Property-based tests: random configurations and shapes, drawn by hypothesis.

Each test is parametrised over every registered pairwise variant (so every variant is
exercised in every profile) and draws the rest of the case:

- B from 1 to 3, C from 1 to 16, C′ from 1 to 8 or the default max(C // 2, 1);
- 1 to 3 spatial dims, each from 1 up to 9 (1D), 6 (2D) or 4 (3D): size 1 and odd sizes
  included, so max-pool floors and key sets of a single position occur;
- sub_sample off, or a kernel of 1 to 3 per dim (never larger than the dim), and the pool
  order;
- batch norm or none, training or eval, any subset of the biases, and a scale where the
  variant has one (concatenation refuses it);
- float32 or float64.

and checks that shapes and dtypes are right, that the float64 gradient check passes, and
that NumPy and array-api-strict agree. Batch norm in training mode needs B·N ≥ 2; a draw
with B·N = 1 must raise the documented ValueError instead (see docs/errors.md).

The number of examples comes from the hypothesis profile (tests/conftest.py): each test
runs ``EXAMPLES[test]`` × the profile's max_examples per variant. ``HYPOTHESIS_PROFILE=ci``
(the default, max_examples 40) gives 80 draws per variant for the shapes, 40 for the
gradient check and 40 for the backends; ``dev`` and ``thorough`` run 5× and 25× as many.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np
import pytest
from hypothesis import assume, event, given, note, settings
from hypothesis import strategies as st

import nlref
from nlref.config import BIAS_LAYERS, POOL_ORDERS

from .conftest import require
from .grid import VARIANTS

MAX_SIZE = {1: 9, 2: 6, 3: 4}  # per spatial dim, by number of spatial dims
NUMPY = array_api_compat.array_namespace(np.empty(0))

# examples per test and variant, as a multiple of the profile's max_examples
EXAMPLES = {"shapes": 2, "gradcheck": 1, "backends": 1}


def examples(test: str) -> int:
    return EXAMPLES[test] * settings.default.max_examples


@dataclass(frozen=True)
class Case:
    cfg: nlref.NonLocalConfig
    shape: tuple[int, ...]
    training: bool
    dtype: str
    seed: int

    @property
    def key_shape(self) -> tuple[int, ...]:
        spatial = self.shape[2:]
        kernel = self.cfg.sub_sample
        if kernel is None:
            return spatial
        return tuple(s // k for s, k in zip(spatial, kernel, strict=True))

    @property
    def one_value_per_channel(self) -> bool:
        """Batch norm in training mode with B·N = 1: refused, as in PyTorch."""
        batch_norm_train = self.cfg.norm == "batchnorm" and self.training
        return batch_norm_train and self.shape[0] * math.prod(self.shape[2:]) < 2

    @property
    def zero_variance_batch_norm(self) -> bool:
        """Training-mode BN whose input is the same at every position, by construction.

        With a softmax over a single key position every attention row is [1], so y is the
        same at every query position; with B = 1, BN then normalises M equal values: its
        output is exactly β whatever the weights, and the true gradients of g and W_z are 0.
        Finite differences of that are rounding noise amplified by 1/√ε (ε = bn_eps).
        """
        return (
            self.cfg.norm == "batchnorm"
            and self.training
            and nlref.pairwise.get(self.cfg.pairwise).softmax
            and math.prod(self.key_shape) == 1
            and self.shape[0] == 1
        )


@st.composite
def cases(draw: st.DrawFn, pairwise: str, dtypes: tuple[str, ...] = ("float32", "float64")) -> Case:
    c = draw(st.integers(1, 16), label="C")
    inter = draw(st.one_of(st.none(), st.integers(1, 8)), label="C'")
    b = draw(st.integers(1, 3), label="B")
    dims = draw(st.integers(1, 3), label="spatial dims")
    spatial = tuple(draw(st.integers(1, MAX_SIZE[dims]), label="S") for _ in range(dims))
    sub_sample = None
    if draw(st.booleans(), label="pooled"):
        sub_sample = tuple(draw(st.integers(1, min(s, 3)), label="k") for s in spatial)
    scale = None
    if nlref.pairwise.get(pairwise).uses_scale:
        scale = draw(st.one_of(st.none(), st.floats(0.05, 2.0)), label="scale")
    cfg = nlref.NonLocalConfig(
        in_channels=c,
        inter_channels=inter,
        pairwise=pairwise,
        scale=scale,
        sub_sample=sub_sample,
        pool_order=draw(st.sampled_from(POOL_ORDERS), label="pool order"),
        norm=draw(st.sampled_from(["batchnorm", None]), label="norm"),
        biases=tuple(draw(st.sets(st.sampled_from(BIAS_LAYERS)), label="biases")),
    )
    return Case(
        cfg=cfg,
        shape=(b, c, *spatial),
        training=draw(st.booleans(), label="training"),
        dtype=draw(st.sampled_from(dtypes), label="dtype"),
        seed=draw(st.integers(0, 2**32 - 1), label="seed"),
    )


def describe(case: Case) -> None:
    """Record the case, and what kind of case it is (``--hypothesis-show-statistics``)."""
    note(repr(case))
    cfg = case.cfg
    event(f"{len(case.shape) - 2}D")
    event("pooled, " + cfg.pool_order if cfg.sub_sample else "not pooled")
    event(f"norm={cfg.norm}, training={case.training}")
    event(case.dtype)
    if math.prod(case.key_shape) == 1:
        event("a single key position")
    if 1 in case.shape[2:]:
        event("a spatial dim of size 1")


def plain_inputs(case: Case, xp: Any) -> tuple[Any, dict[str, Any], Any]:
    """x, params and dz from NumPy's generator, moved to ``xp``: the same values everywhere."""
    gen = np.random.default_rng(case.seed)
    params = nlref.init_params(case.cfg, gen, scheme="random", dtype=case.dtype, xp=xp)
    dtype = getattr(xp, case.dtype)
    x = xp.asarray(gen.standard_normal(case.shape), dtype=dtype)
    dz = xp.asarray(gen.standard_normal(case.shape), dtype=dtype)
    return x, params, dz


def run(case: Case, xp: Any) -> dict[str, Any]:
    """Forward and backward; every output by name, as NumPy arrays."""
    x, params, dz = plain_inputs(case, xp)
    z, cache = nlref.forward(x, params, case.cfg, training=case.training)
    dx, grads = nlref.backward(dz, cache)
    out = {"z": z, "attention": cache.attention, "dx": dx}
    out.update({f"grad {n}": g for n, g in grads.items()})
    out.update({f"buffer {n}": v for n, v in cache.updated_buffers.items()})
    return {k: nlref.to_numpy(v) for k, v in out.items()}


@pytest.mark.parametrize("pairwise", VARIANTS)
@settings(max_examples=examples("shapes"))
@given(data=st.data())
def test_shapes_and_dtypes(pairwise: str, data: st.DataObject) -> None:
    case = data.draw(cases(pairwise), label="case")
    describe(case)
    x, params, dz = plain_inputs(case, NUMPY)
    if case.one_value_per_channel:
        with pytest.raises(ValueError, match=r"more than 1 value per channel"):
            nlref.forward(x, params, case.cfg, training=case.training)
        return
    z, cache = nlref.forward(x, params, case.cfg, training=case.training)
    dx, grads = nlref.backward(dz, cache)
    b, c, *spatial = case.shape
    n, n_keys = math.prod(spatial), math.prod(case.key_shape)
    assert n_keys >= 1
    dtype = np.dtype(case.dtype)

    assert z.shape == case.shape and z.dtype == dtype
    assert cache.attention.shape == (b, n, n_keys) and cache.attention.dtype == dtype
    assert cache.key_shape == case.key_shape
    assert dx.shape == case.shape and dx.dtype == dtype
    assert tuple(grads) == nlref.trainable_names(case.cfg)
    for name, grad in grads.items():
        assert grad.shape == params[name].shape == nlref.param_shapes(case.cfg)[name], name
        assert grad.dtype == dtype, name
    if case.cfg.norm == "batchnorm" and case.training:
        assert tuple(cache.updated_buffers) == nlref.BUFFERS
        for value in cache.updated_buffers.values():
            assert value.shape == (c,) and value.dtype == dtype
    else:
        assert cache.updated_buffers == {}
    for name, value in [("z", z), ("attention", cache.attention), ("dx", dx), *grads.items()]:
        assert np.all(np.isfinite(value)), name  # unit-scale random data: nothing overflows
    if nlref.pairwise.get(pairwise).softmax:
        np.testing.assert_allclose(cache.attention.sum(axis=-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("pairwise", VARIANTS)
@settings(max_examples=examples("gradcheck"))
@given(data=st.data())
def test_float64_gradcheck(pairwise: str, data: st.DataObject) -> None:
    case = data.draw(cases(pairwise, dtypes=("float64",)), label="case")
    describe(case)
    assume(not case.one_value_per_channel)  # refused: see test_shapes_and_dtypes
    gen = np.random.default_rng(case.seed)
    # away from max-pool ties and ReLU kinks, with live concatenation ReLUs
    params, x = nlref.draw_smooth_case(case.cfg, case.shape, rng=gen)
    dz = gen.standard_normal(case.shape)
    # gradcheck adds its estimate of the finite-difference rounding noise to atol, but that
    # estimate does not see how the block amplifies rounding (training-mode BN divides by
    # the batch std). A gradient that is exactly 0 by structure (φ's under BN with B = 1 and
    # every concatenation ReLU active, say) would fail on noise alone, so atol also scales
    # with the largest gradient entry: 1e-9 of it is far below what a wrong formula gives.
    _, cache = nlref.forward(x, params, case.cfg, training=case.training)
    dx, grads = nlref.backward(dz, cache)
    grad_scale = max(float(np.max(np.abs(g))) for g in [dx, *grads.values()])
    atol = 1e-7 + 1e-9 * grad_scale
    if case.zero_variance_batch_norm:
        event("BN of a constant: atol scaled by 1/sqrt(bn_eps)")
        atol /= math.sqrt(case.cfg.bn_eps)
    result = nlref.gradcheck_block(
        case.cfg, x, params, training=case.training, rng=gen, dout=dz, atol=atol
    )
    assert result.ok
    assert set(result.args) == {"x", *nlref.trainable_names(case.cfg)}


@pytest.mark.parametrize("pairwise", VARIANTS)
@settings(max_examples=examples("backends"))
@given(data=st.data())
def test_numpy_and_array_api_strict_agree(pairwise: str, data: st.DataObject) -> None:
    strict = require("array_api_strict")
    case = data.draw(cases(pairwise), label="case")
    describe(case)
    assume(not case.one_value_per_channel)
    got_numpy = run(case, NUMPY)
    got_strict = run(case, strict)
    assert list(got_numpy) == list(got_strict)
    rtol = 1e-5 if case.dtype == "float32" else 1e-12
    for key, value in got_numpy.items():
        other = got_strict[key]
        assert other.dtype == value.dtype and other.shape == value.shape, key
        # rounding may differ with the summation order; relative to the tensor's scale
        atol = rtol * max(1.0, float(np.max(np.abs(value), initial=0.0)))
        np.testing.assert_allclose(other, value, rtol=rtol, atol=atol, err_msg=key)
