"""Extreme values: where the mathematics is finite, so is everything nlref returns.

Inside the finite domain (every quantity the formulas name, including the logits, the
batch-norm variance and the updated running variance, representable in the dtype) the
forward, the attention and every gradient must be finite, with no overflow, invalid
operation or division by zero anywhere: those run under ``np.errstate(over="raise",
invalid="raise", divide="raise")`` with every warning turned into an error. Underflow is
allowed: exp of a logit 1e4 below its row's max is exactly 0 in any floating type, and 0 is
the right answer.

- logits of magnitude 1e4 and far beyond, from the Gaussian on large raw x and from the
  embedded Gaussian with large weights (float64 up to 1e200, float32 up to 1e30);
- identical rows (every position the same): uniform attention, and zero variance in
  training-mode batch norm when the batch is identical too;
- all-zero input, where batch norm sees zero variance;
- large float32 activations.

NaN and ±inf in x propagate as they do in PyTorch, with no exception: the same entries of
z, the attention, dx and every gradient are NaN or ±inf as in an independent PyTorch
autograd implementation (``torch_reference.py``), and the finite entries agree. One
documented difference: with ±inf in x, the concatenation weight's gradient sums
θ·(Σⱼ ∂pᵢⱼ) where PyTorch sums Σⱼ θ·∂pᵢⱼ over the materialised pairs, so an entry can be
±inf in nlref and NaN in PyTorch (non-finite in both). See docs/errors.md.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any

import array_api_compat
import numpy as np
import pytest

import nlref
from nlref.layers import batchnorm

from . import grid
from .conftest import require_torch
from .grid import NORMS, SUB_SAMPLES, VARIANTS, B, C, host
from .torch_reference import torch_block

SHAPE = grid.shape(2)


@contextlib.contextmanager
def finite_arithmetic() -> Iterator[None]:
    """Overflow, invalid operations and division by zero raise; any warning is an error."""
    with (
        np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("error")
        yield


def make_cfg(pairwise: str, sub: str, norm: str | None, **kw: Any) -> nlref.NonLocalConfig:
    """A 2D grid config, unscaled: the expected logits below are xᵢᵀxⱼ themselves."""
    return grid.config(pairwise, 2, sub, norm, scale=None, **kw)


def run(
    x: Any, params: dict[str, Any], cfg: nlref.NonLocalConfig, training: bool, seed: int = 1
) -> dict[str, np.ndarray]:
    """Forward and backward (random upstream gradient); every output, as NumPy arrays."""
    xp = array_api_compat.array_namespace(x)
    dz = xp.asarray(np.random.default_rng(seed).standard_normal(tuple(x.shape)), dtype=x.dtype)
    z, cache = nlref.forward(x, params, cfg, training=training)
    dx, grads = nlref.backward(dz, cache)
    out = {"z": z, "attention": cache.attention, "dx": dx}
    out.update(grads)
    out.update(cache.updated_buffers)
    return {name: host(value) for name, value in out.items()}


def assert_all_finite(out: dict[str, np.ndarray]) -> None:
    for name, value in out.items():
        bad = ~np.isfinite(value)
        assert not bad.any(), f"{name}: {int(bad.sum())} non-finite entries"


def assert_matches_torch(
    out: dict[str, np.ndarray], x: Any, params: dict[str, Any], cfg: Any, training: bool
) -> None:
    """Finite values agree with the PyTorch reference, relative to each tensor's scale."""
    require_torch()
    dz = np.random.default_rng(1).standard_normal(tuple(x.shape))
    ref = torch_block(
        host(x), {n: host(v) for n, v in params.items()}, cfg, training=training, dz=dz
    )
    want = {"z": ref["z"], "attention": ref["attention"], "dx": ref["dx"]}
    want.update(ref["grads"])
    if training:
        want.update(ref["buffers"])
    assert_close(out, want, cfg, rtol=1e-9)


def assert_close(
    got: dict[str, np.ndarray], want: dict[str, np.ndarray], cfg: Any, rtol: float
) -> None:
    """``got`` matches ``want`` to ``rtol``, with an absolute floor of ``rtol`` × the scale.

    A gradient that is 0 by structure (g's bias under training-mode BN) is rounding noise in
    both, so gradients are compared relative to the largest gradient entry; the other
    tensors relative to their own largest entry.
    """
    assert set(want) == set(got)
    scale = grid.scales(want, ["dx", *nlref.trainable_names(cfg)])
    for name, value in got.items():
        np.testing.assert_allclose(
            value, want[name], rtol=rtol, atol=rtol * scale[name], err_msg=name
        )


# --- huge logits ---------------------------------------------------------------------


@pytest.mark.parametrize("norm_id", list(NORMS))
@pytest.mark.parametrize("sub", list(SUB_SAMPLES))
@pytest.mark.parametrize(
    ("dtype", "logit"),
    [("float64", 1e4), ("float64", 1e16), ("float64", 1e200), ("float32", 1e4), ("float32", 1e30)],
    ids=lambda v: str(v),
)
def test_gaussian_on_large_raw_x(dtype: str, logit: float, sub: str, norm_id: str, xp: Any) -> None:
    """The Gaussian compares raw x: |x| ~ √(logit / C) gives logits xᵢᵀxⱼ of that size."""
    norm, training = NORMS[norm_id]
    cfg = make_cfg("gaussian", sub, norm)
    params = nlref.init_params(cfg, rng=0, scheme="random", dtype=dtype, xp=xp)
    host_x = np.random.default_rng(2).standard_normal(SHAPE) * math.sqrt(logit / C)
    x = xp.asarray(host_x, dtype=getattr(xp, dtype))
    flat = host_x.reshape(B, C, -1)
    assert np.max(np.abs(np.einsum("bci,bcj->bij", flat, flat))) >= logit  # really that large

    with finite_arithmetic():
        out = run(x, params, cfg, training)
    assert_all_finite(out)
    attention = out["attention"]
    rtol = 1e-12 if dtype == "float64" else 1e-5
    np.testing.assert_allclose(attention.sum(axis=-1), 1.0, rtol=rtol)
    assert np.all(attention >= 0)
    # logits this far apart make every row one-hot at its largest logit
    assert np.mean(np.max(attention, axis=-1) > 1 - rtol) > 0.9
    if sub == "full" and dtype == "float64":
        logits = np.einsum("bci,bcj->bij", flat, flat)
        expected = np.exp(logits - logits.max(axis=-1, keepdims=True))
        expected /= expected.sum(axis=-1, keepdims=True)
        # exp turns the rounding error of a logit (a few ulp of the largest) into a relative
        # error of the attention
        rtol = max(1e-13, 64 * np.finfo(np.float64).eps * float(np.max(np.abs(logits))))
        np.testing.assert_allclose(attention, expected, rtol=rtol, atol=1e-300)
        if array_api_compat.is_numpy_namespace(xp):  # the reference once, not per backend
            assert_matches_torch(out, x, params, cfg, training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("sub", list(SUB_SAMPLES))
@pytest.mark.parametrize(
    ("dtype", "logit"), [("float64", 1e4), ("float64", 1e100), ("float32", 1e4), ("float32", 1e20)]
)
def test_embedded_gaussian_with_huge_logits(
    dtype: str, logit: float, sub: str, training: bool, xp: Any
) -> None:
    """θᵢᵀφⱼ of the given size from large θ and φ weights, on unit-scale x."""
    cfg = make_cfg("embedded_gaussian", sub, "batchnorm")
    host_params = nlref.init_params(cfg, rng=0, scheme="random")
    # θ, φ ~ √logit / C′ per channel: θᵢᵀφⱼ ~ logit
    for layer in ("theta", "phi"):
        host_params[f"{layer}.weight"] = host_params[f"{layer}.weight"] * math.sqrt(logit)
    params = {n: xp.asarray(v, dtype=getattr(xp, dtype)) for n, v in host_params.items()}
    x = xp.asarray(np.random.default_rng(2).standard_normal(SHAPE), dtype=getattr(xp, dtype))
    with finite_arithmetic():
        out = run(x, params, cfg, training)
    assert_all_finite(out)
    np.testing.assert_allclose(out["attention"].sum(axis=-1), 1.0, rtol=1e-5)
    assert np.mean(np.max(out["attention"], axis=-1) > 0.99) > 0.5  # mostly saturated


# --- identical rows, zeros ----------------------------------------------------------------


@pytest.mark.parametrize("norm_id", list(NORMS))
@pytest.mark.parametrize("sub", list(SUB_SAMPLES))
@pytest.mark.parametrize("pairwise", VARIANTS)
@pytest.mark.parametrize("same_batch", [True, False], ids=["same-batch", "per-sample"])
def test_identical_rows(pairwise: str, sub: str, norm_id: str, same_batch: bool, xp: Any) -> None:
    """Every position of x is the same vector (and, with same_batch, every sample too)."""
    norm, training = NORMS[norm_id]
    cfg = make_cfg(pairwise, sub, norm)
    params = nlref.init_params(cfg, rng=0, scheme="random", xp=xp)
    rows = np.random.default_rng(3).standard_normal((1 if same_batch else B, C, 1, 1)) * 3
    x = xp.asarray(np.broadcast_to(rows, SHAPE).copy(), dtype=xp.float64)
    with finite_arithmetic():
        out = run(x, params, cfg, training)
    assert_all_finite(out)
    n_keys = out["attention"].shape[-1]
    attention = out["attention"]
    # Equal in exact arithmetic; BLAS may round identical columns' products differently
    # (~1e-14 relative on the logits), which exp turns into ~1e-12 on the weights.
    if nlref.pairwise.get(pairwise).softmax:  # equal logits: uniform attention
        np.testing.assert_allclose(attention, np.full_like(attention, 1 / n_keys), rtol=1e-10)
    # every query position sees the same keys: all attention rows are equal
    rows = np.broadcast_to(attention[:, :1], attention.shape)
    np.testing.assert_allclose(attention, rows, rtol=1e-10, atol=1e-10 * np.max(attention))
    if same_batch and norm == "batchnorm" and training:
        # BN sees zero variance: its output is β (up to rounding of the batch mean)
        beta = host(params["bn.bias"])[None, :, None, None]
        np.testing.assert_allclose(out["z"] - host(x), np.broadcast_to(beta, SHAPE), atol=1e-9)
    if array_api_compat.is_numpy_namespace(xp):
        assert_matches_torch(out, x, params, cfg, training)


@pytest.mark.parametrize("biases", [nlref.config.BIAS_LAYERS, ()], ids=["bias", "nobias"])
@pytest.mark.parametrize("norm_id", list(NORMS))
@pytest.mark.parametrize("sub", list(SUB_SAMPLES))
@pytest.mark.parametrize("pairwise", VARIANTS)
def test_all_zero_input(
    pairwise: str, sub: str, norm_id: str, biases: tuple[str, ...], xp: Any
) -> None:
    """x = 0: batch norm in training mode sees zero variance (every input is b_z or 0)."""
    norm, training = NORMS[norm_id]
    cfg = make_cfg(pairwise, sub, norm, biases=biases)
    params = nlref.init_params(cfg, rng=0, scheme="random", xp=xp)
    x = xp.zeros(SHAPE, dtype=xp.float64)
    with finite_arithmetic():
        out = run(x, params, cfg, training)
    assert_all_finite(out)
    if norm == "batchnorm" and training:  # zero variance: BN outputs β
        beta = np.broadcast_to(host(params["bn.bias"])[None, :, None, None], SHAPE)
        if biases:
            np.testing.assert_allclose(out["z"], beta, atol=1e-12)
        else:  # everything before BN is exactly 0
            np.testing.assert_array_equal(out["z"], beta)
            np.testing.assert_array_equal(out["bn.weight"], np.zeros(C))  # Σ dz·x̂, x̂ = 0
    if not biases and norm is None:
        np.testing.assert_array_equal(out["z"], np.zeros(SHAPE))
    if array_api_compat.is_numpy_namespace(xp):
        assert_matches_torch(out, x, params, cfg, training)


# --- large float32 activations ----------------------------------------------------------


@pytest.mark.parametrize("magnitude", [1e2, 1e4, 1e6])
@pytest.mark.parametrize("norm_id", list(NORMS))
@pytest.mark.parametrize("sub", ["full", "pool_before"])
@pytest.mark.parametrize("pairwise", VARIANTS)
def test_large_float32_activations(
    pairwise: str, sub: str, norm_id: str, magnitude: float, xp: Any
) -> None:
    """x of magnitude up to 1e6 in float32 stays finite and float32, close to float64."""
    norm, training = NORMS[norm_id]
    cfg = make_cfg(pairwise, sub, norm)
    params = nlref.init_params(cfg, rng=0, scheme="random", dtype="float32", xp=xp)
    host_x = (np.random.default_rng(4).standard_normal(SHAPE) * magnitude).astype(np.float32)
    x = xp.asarray(host_x)
    with finite_arithmetic():
        out = run(x, params, cfg, training)
    assert_all_finite(out)
    assert all(v.dtype == np.float32 for v in out.values())
    if nlref.pairwise.get(pairwise).softmax:
        np.testing.assert_allclose(out["attention"].sum(axis=-1), 1.0, rtol=1e-5)
    elif magnitude <= 1e4:
        # no exponential: the float32 result is the float64 one to float32 precision,
        # relative to each tensor's scale
        p64 = {n: xp.astype(v, xp.float64) for n, v in params.items()}
        want = run(xp.astype(x, xp.float64), p64, cfg, training)
        assert_close(out, want, cfg, rtol=1e-4)


def test_float32_batch_variance_beyond_float32_is_pytorchs_result(torch: Any) -> None:
    """Outside the finite domain: a batch variance over float32's max (|W_z y| ≳ 1.8e19).

    The unbiased running variance is then not representable: it is inf, and the batch
    variance too, so the normalised values are 0. PyTorch's float32 CPU batch norm gives the
    same (documented in docs/errors.md).
    """
    h = np.random.default_rng(5).standard_normal((2, 3, 10)).astype(np.float32) * 1e24
    one, zero = np.ones(3, np.float32), np.zeros(3, np.float32)
    with np.errstate(over="ignore"):
        out, cache = batchnorm.forward(h, one, zero, zero, one, training=True)
    rm, rv = torch.zeros(3), torch.ones(3)
    ref = torch.nn.functional.batch_norm(
        torch.from_numpy(h), rm, rv, torch.ones(3), torch.zeros(3), training=True
    )
    np.testing.assert_array_equal(out, ref.numpy())
    np.testing.assert_array_equal(cache.running_var, rv.numpy())
    assert np.all(np.isinf(cache.running_var))


# --- NaN and inf -----------------------------------------------------------------------


def nonfinite_pattern(a: np.ndarray) -> np.ndarray:
    """0 finite, 1 NaN, 2 +inf, 3 -inf."""
    return np.select([np.isnan(a), np.isposinf(a), np.isneginf(a)], [1, 2, 3], 0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("norm_id", list(NORMS))
@pytest.mark.parametrize("sub", list(SUB_SAMPLES))
@pytest.mark.parametrize("pairwise", VARIANTS)
def test_nan_and_inf_propagate_like_pytorch(
    pairwise: str, sub: str, norm_id: str, bad: float, xp: Any, torch: Any
) -> None:
    norm, training = NORMS[norm_id]
    cfg = make_cfg(pairwise, sub, norm)
    params, host_x = nlref.draw_smooth_case(cfg, SHAPE, rng=6)
    host_x[1, 2, 3, 1] = bad
    dz = np.random.default_rng(1).standard_normal(SHAPE)
    x = xp.asarray(host_x)
    xparams = {n: xp.asarray(v) for n, v in params.items()}

    with warnings.catch_warnings():
        # NumPy may warn "invalid value encountered" (inf - inf): nlref leaves NumPy's error
        # state to the caller and raises nothing itself
        warnings.simplefilter("ignore", RuntimeWarning)
        z, cache = nlref.forward(x, xparams, cfg, training=training)
        dx, grads = nlref.backward(xp.asarray(dz), cache)
    ref = torch_block(host_x, params, cfg, training=training, dz=dz)

    got = {"z": z, "attention": cache.attention, "dx": dx, **grads, **cache.updated_buffers}
    want = {"z": ref["z"], "attention": ref["attention"], "dx": ref["dx"], **ref["grads"]}
    if training:
        want.update(ref["buffers"])
    assert set(got) == set(want)
    assert not np.all(np.isfinite(host(z)))  # the bad value did reach the output
    for name, value in got.items():
        mine, theirs = host(value), want[name]
        if name == "concat.weight" and math.isinf(bad):
            # regrouped sum (see the module docstring): non-finite exactly where PyTorch's is
            np.testing.assert_array_equal(np.isfinite(mine), np.isfinite(theirs), err_msg=name)
        else:
            np.testing.assert_array_equal(
                nonfinite_pattern(mine), nonfinite_pattern(theirs), err_msg=name
            )
        finite = np.isfinite(theirs)
        np.testing.assert_allclose(mine[finite], theirs[finite], rtol=1e-9, atol=1e-9, err_msg=name)
