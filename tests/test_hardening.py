"""Edges found by trying to break nlref: float32 batch norm near float32's limit, and the
variations of the boundary checks that docs/errors.md lists one row for.

Batch norm in float32 must stay finite for every batch variance below float32's max
(3.4e38), as docs/errors.md promises: the layer is checked at variances from 1e30 to
3.3e38 against float64 arithmetic written out here, and against PyTorch's float32
``batch_norm`` where that is finite itself: PyTorch's CPU kernel (2.13) forms the sum of
squared deviations in float32, so its running variance is inf, and γ's gradient 0, once
M·σ² exceeds 3.4e38. The whole block is checked on the input that once overflowed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import nlref
from nlref.layers import batchnorm

from .conftest import require

VARIANCES = [1e30, 1e34, 1e36, 1e37, 1e38, 3e38, 3.3e38]
B, C, N = 2, 4, 16  # M = 32 values per channel: Σ(h − μ)² = 32·var overflows from 1.1e37
F32_MAX = float(np.finfo(np.float32).max)


def finite_arithmetic() -> Any:
    return np.errstate(over="raise", invalid="raise", divide="raise")


def bn_input(var: float) -> np.ndarray:
    """h (B, C, N) in float32 whose channel c has batch variance var·(1, 0.5, 1e-3, 1e-9)[c]
    and a mean that is not 0."""
    z = np.random.default_rng(0).standard_normal((B, C, N))
    z -= z.mean(axis=(0, 2), keepdims=True)
    z /= np.sqrt((z**2).mean(axis=(0, 2), keepdims=True))
    spread = np.sqrt(var * np.array([1.0, 0.5, 1e-3, 1e-9]))[None, :, None]
    return (z * spread + 0.5 * spread).astype(np.float32)


def float64_truth(h: np.ndarray, dout: np.ndarray, gamma: np.ndarray) -> dict[str, np.ndarray]:
    """Training-mode batch norm and its gradients, in float64, from the textbook formulas."""
    h, dout, gamma = (a.astype(np.float64) for a in (h, dout, gamma))
    m = h.shape[0] * h.shape[2]
    mean = h.mean(axis=(0, 2))
    var = ((h - mean[:, None]) ** 2).mean(axis=(0, 2))
    xhat = (h - mean[:, None]) / np.sqrt(var + 1e-5)[:, None]
    dweight = (dout * xhat).sum(axis=(0, 2))
    dbias = dout.sum(axis=(0, 2))
    dh = (gamma / np.sqrt(var + 1e-5))[:, None] * (
        dout - (dbias / m)[:, None] - xhat * (dweight / m)[:, None]
    )
    return {
        "out": gamma[:, None] * xhat,
        "running_var": 0.9 + 0.1 * var * m / (m - 1),
        "dh": dh,
        "dweight": dweight,
        "dbias": dbias,
    }


def run_nlref(h: np.ndarray, dout: np.ndarray, gamma: np.ndarray) -> dict[str, np.ndarray]:
    zero, one = np.zeros(C, np.float32), np.ones(C, np.float32)
    with finite_arithmetic():  # no overflow anywhere, not even in a temporary
        out, cache = batchnorm.forward(h, gamma, zero, zero, one, training=True)
        grads = batchnorm.backward(dout, cache)
    got = {"out": out, "running_var": cache.running_var, "dh": grads.dh}
    return {**got, "dweight": grads.dweight, "dbias": grads.dbias}


def assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], rtol: float) -> None:
    for name, value in want.items():
        assert got[name].dtype == np.float32, name
        assert np.all(np.isfinite(got[name])), name
        scale = float(np.max(np.abs(value)))
        np.testing.assert_allclose(got[name], value, rtol=rtol, atol=rtol * scale, err_msg=name)


def bn_case(var: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    h = bn_input(var)
    dout = np.random.default_rng(1).standard_normal(h.shape).astype(np.float32)
    gamma = np.random.default_rng(2).uniform(0.5, 1.5, C).astype(np.float32)
    return h, dout, gamma


@pytest.mark.parametrize("var", VARIANCES)
def test_float32_batchnorm_finite_up_to_float32_max(var: float) -> None:
    h, dout, gamma = bn_case(var)
    assert_close(run_nlref(h, dout, gamma), float64_truth(h, dout, gamma), rtol=2e-5)


@pytest.mark.parametrize("var", [v for v in VARIANCES if B * N * v < F32_MAX])
def test_float32_batchnorm_matches_pytorch_float32(var: float) -> None:
    torch = require("torch")
    h, dout, gamma = bn_case(var)
    ht = torch.tensor(h, requires_grad=True)
    gt = torch.tensor(gamma, requires_grad=True)
    bt = torch.zeros(C, requires_grad=True)
    rm, rv = torch.zeros(C), torch.ones(C)
    out = torch.nn.functional.batch_norm(ht, rm, rv, gt, bt, training=True, eps=1e-5)
    out.backward(torch.tensor(dout))
    want = {"out": out, "running_var": rv, "dh": ht.grad, "dweight": gt.grad, "dbias": bt.grad}
    want = {k: v.detach().numpy() for k, v in want.items()}
    assert all(np.all(np.isfinite(v)) for v in want.values())
    assert_close(run_nlref(h, dout, gamma), want, rtol=1e-4)


def test_block_float32_dot_product_large_input() -> None:
    """The dot product on x ~ N(0, 1)·3e6 in float32: h = W_z y has a batch variance around
    1e36, which is finite; so must be the running variance and γ's gradient (about -7)."""
    cfg = nlref.NonLocalConfig(in_channels=4, pairwise="dot_product")
    p32 = nlref.init_params(cfg, rng=0, scheme="random", dtype="float32")
    x = (np.random.default_rng(0).standard_normal((2, 4, 8, 8)) * 3e6).astype(np.float32)
    dz = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    with finite_arithmetic():
        _, cache = nlref.forward(x, p32, cfg, training=True)
        _, grads = nlref.backward(dz, cache)
    p64 = {n: v.astype(np.float64) for n, v in p32.items()}
    _, cache64 = nlref.forward(x.astype(np.float64), p64, cfg, training=True)
    _, grads64 = nlref.backward(dz.astype(np.float64), cache64)
    running_var = cache.updated_buffers["bn.running_var"]
    want_var = cache64.updated_buffers["bn.running_var"]
    assert np.all(np.isfinite(running_var)) and np.all(want_var > 5e34)
    np.testing.assert_allclose(running_var, want_var, rtol=1e-4)
    np.testing.assert_allclose(grads["bn.weight"], grads64["bn.weight"], rtol=1e-3, atol=1e-3)
    assert np.all(np.abs(grads["bn.weight"]) > 1)  # no channel's γ gradient collapsed to 0


def test_block_float32_large_input_matches_pytorch_batchnorm() -> None:
    """The same block: its BN input h, given to PyTorch's batch norm, gives nlref's running
    variance and γ gradient. In float64: PyTorch's float32 CPU batch norm overflows here
    (M·σ² ≈ 1e38 for two channels)."""
    torch = require("torch")
    cfg = nlref.NonLocalConfig(in_channels=4, pairwise="dot_product")
    p32 = nlref.init_params(cfg, rng=0, scheme="random", dtype="float32")
    x = (np.random.default_rng(0).standard_normal((2, 4, 8, 8)) * 3e6).astype(np.float32)
    dz = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    _, cache = nlref.forward(x, p32, cfg, training=True)
    _, grads = nlref.backward(dz, cache)
    no_bn = nlref.NonLocalConfig(in_channels=4, pairwise="dot_product", norm=None)
    p_no_bn = {n: v for n, v in p32.items() if n in nlref.param_shapes(no_bn)}
    z_no_bn, _ = nlref.forward(x, p_no_bn, no_bn)
    h = torch.tensor((z_no_bn - x).reshape(2, 4, 64), dtype=torch.float64)  # h = W_z y + b_z
    p64 = {n: torch.tensor(v, dtype=torch.float64) for n, v in p32.items()}
    gamma = p64["bn.weight"].requires_grad_(True)
    rm, rv = p64["bn.running_mean"], p64["bn.running_var"]
    out = torch.nn.functional.batch_norm(h, rm, rv, gamma, p64["bn.bias"], training=True)
    out.backward(torch.tensor(dz.reshape(2, 4, 64), dtype=torch.float64))
    assert torch.all(torch.isfinite(rv))
    np.testing.assert_allclose(cache.updated_buffers["bn.running_var"], rv.numpy(), rtol=1e-4)
    np.testing.assert_allclose(grads["bn.weight"], gamma.grad.numpy(), rtol=1e-3, atol=1e-3)


def test_float32_variance_beyond_float32_is_still_inf() -> None:
    """Past the limit the variance is not representable: inf, as before, and PyTorch's."""
    h, _, gamma = bn_case(1e39)  # variances 1e39, 5e38, 1e36, 1e30
    zero, one = np.zeros(C, np.float32), np.ones(C, np.float32)
    with np.errstate(over="ignore"):
        _, cache = batchnorm.forward(h, gamma, zero, zero, one, training=True)
    assert np.all(np.isinf(cache.running_var[:2])) and np.all(np.isfinite(cache.running_var[2:]))


def test_zero_variance_channel_is_exactly_beta() -> None:
    """The scale of a channel whose deviations are all 0 is 1: its output is β exactly."""
    h = np.full((2, 3, 5), 7.0)
    beta = np.array([0.5, -1.0, 2.0])
    out, cache = batchnorm.forward(h, np.ones(3), beta, np.zeros(3), np.ones(3), training=True)
    np.testing.assert_array_equal(out, np.broadcast_to(beta[None, :, None], h.shape))
    np.testing.assert_array_equal(cache.normalised, np.zeros(h.shape))


# --- variations of the boundary rows of docs/errors.md ---------------------------------------


def small_case() -> tuple[Any, dict[str, Any], np.ndarray]:
    cfg = nlref.NonLocalConfig(in_channels=4)
    params = nlref.init_params(cfg, rng=0, scheme="random")
    return cfg, params, np.random.default_rng(0).standard_normal((2, 4, 7))


@pytest.mark.parametrize("limit", ["big", 1.5, 2e9, True, [2**30]])
def test_memory_limit_of_another_type(limit: Any) -> None:
    cfg, params, x = small_case()
    with pytest.raises(TypeError, match=r"memory_limit must be None or a positive int \(bytes\)"):
        nlref.forward(x, params, cfg, memory_limit=limit)


@pytest.mark.parametrize("value", [np.int64(2), np.uint8(2), np.int32(3)])
def test_numpy_ints_for_threads_and_chunk_size(value: Any) -> None:
    cfg, params, x = small_case()
    _, cache = nlref.forward(x, params, cfg, threads=value, chunk_size=value)
    assert type(cache.plan.threads) is int and type(cache.plan.chunk_size) is int
    assert cache.plan.threads == int(value) and cache.plan.chunk_size == int(value)


@pytest.mark.parametrize("value", [np.True_, np.bool_(True), 2.0, np.float64(2.0)])
def test_bools_and_floats_are_not_thread_counts(value: Any) -> None:
    cfg, params, x = small_case()
    with pytest.raises(TypeError, match=r"threads must be None or an int >= 1, got .*\("):
        nlref.forward(x, params, cfg, threads=value)


@pytest.mark.parametrize(
    ("field", "value", "error", "message"),
    [
        ("inter_channels", np.float32(4), TypeError, "inter_channels must be an int, got np.flo"),
        ("inter_channels", np.True_, TypeError, "inter_channels must be an int, got np.True_"),
        ("bn_momentum", np.float32(0.1), None, ""),
        ("bn_momentum", np.float64(1.5), ValueError, r"must be a float in \[0, 1\], got np.float"),
        ("bn_momentum", "0.1", TypeError, r"bn_momentum must be a float in \[0, 1\], got '0.1'"),
        pytest.param(
            "bn_eps",
            10**400,
            ValueError,
            "bn_eps must be a finite positive float, got 1000",
            id="bn_eps-10**400",
        ),
        ("bn_eps", np.float32(0), ValueError, "bn_eps must be a finite positive float"),
        ("scale", np.float32(0.5), None, ""),
        ("scale", np.float16(0.5), None, ""),
        ("scale", True, TypeError, r"scale must be a float or None, got True \(bool\)"),
        pytest.param(
            "scale",
            -(10**400),
            ValueError,
            "scale must be a finite positive float",
            id="scale--10**400",
        ),
    ],
)
def test_config_numbers(field: str, value: Any, error: type | None, message: str) -> None:
    if error is None:
        cfg = nlref.NonLocalConfig(in_channels=4, **{field: value})
        assert type(getattr(cfg, field)) is float
        assert getattr(cfg, field) == pytest.approx(float(value))
        assert nlref.NonLocalConfig(**cfg.to_dict()) == cfg
        return
    with pytest.raises(error, match=message):
        nlref.NonLocalConfig(in_channels=4, **{field: value})


def test_bn_eps_that_is_positive_in_float32_works() -> None:
    """The smallest positive float32 is accepted, and a zero input gives β, finitely."""
    cfg = nlref.NonLocalConfig(in_channels=4, bn_eps=1.5e-45)
    params = nlref.init_params(cfg, rng=0, scheme="random", dtype="float32")
    with finite_arithmetic():
        z, _ = nlref.forward(np.zeros((2, 4, 3), np.float32), params, cfg)
    assert np.all(np.isfinite(z))
    # without batch norm, and in float64, a tiny ε is irrelevant or representable
    nlref.forward(np.zeros((2, 4, 3)), nlref.init_params(cfg), cfg)


def test_big_endian_parameters_in_float32_and_a_masked_bias() -> None:
    cfg, params, x = small_case()
    params["z.bias"] = np.ma.masked_array(params["z.bias"], mask=[1, 0, 0, 0])
    with pytest.raises(TypeError, match=r"parameter 'z\.bias' is a numpy\.ma\.MaskedArray"):
        nlref.forward(x, params, cfg)
    cfg32 = nlref.NonLocalConfig(in_channels=4)
    p32 = nlref.init_params(cfg32, dtype="float32")
    p32["bn.weight"] = p32["bn.weight"].astype(p32["bn.weight"].dtype.newbyteorder("S"))
    with pytest.raises(TypeError, match=r"'bn\.weight' has dtype .*non-native byte order"):
        nlref.forward(x.astype(np.float32), p32, cfg32)
