"""The family's layers: gradient checks on every backend, PyTorch autograd, and properties."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import nlref
from nlref.layers import attention_pool, gate, layernorm, whiten

RNG = np.random.default_rng(7)
X = RNG.standard_normal((2, 5, 6))  # (B, C, N)
LOGITS = RNG.standard_normal((2, 1, 6))  # (B, 1, N)
GATE = RNG.standard_normal((2, 5, 1))  # (B, C, 1)
GAMMA, BETA = RNG.uniform(0.5, 1.5, 5), RNG.normal(0, 0.2, 5)


def _layernorm(a: dict[str, Any]) -> Any:
    return layernorm.forward(a["h"], a["weight"], a["bias"], 1e-5)


def _layernorm_back(d: Any, cache: Any) -> dict[str, Any]:
    g = layernorm.backward(d, cache)
    return {"h": g.dh, "weight": g.dweight, "bias": g.dbias}


def _pair_back(backward: Callable, names: tuple[str, str]) -> Callable:
    return lambda d, cache: dict(zip(names, backward(d, cache), strict=True))


# name -> (forward on a dict of inputs, backward to a dict of gradients, inputs)
LAYERS: dict[str, tuple[Callable, Callable, dict[str, np.ndarray]]] = {
    "layernorm": (_layernorm, _layernorm_back, {"h": X, "weight": GAMMA, "bias": BETA}),
    "gate": (
        lambda a: gate.forward(a["x"], a["t"]),
        _pair_back(gate.backward, ("x", "t")),
        {"x": X, "t": GATE},
    ),
    "whiten": (
        lambda a: whiten.forward(a["u"]),
        lambda d, c: {"u": whiten.backward(d, c)},
        {"u": X},
    ),
    "attention_pool": (
        lambda a: attention_pool.forward(a["logits"], a["values"]),
        _pair_back(attention_pool.backward, ("logits", "values")),
        {"logits": LOGITS, "values": X},
    ),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_gradcheck(name: str, xp: Any) -> None:
    forward, backward, inputs = LAYERS[name]
    moved = {n: xp.asarray(v) for n, v in inputs.items()}
    result = nlref.gradcheck(forward, backward, moved, mode="elementwise")
    assert result.ok and result.max_rel_err < 1e-6, str(result)


def _torch_layer(name: str, torch: Any, a: dict[str, Any]) -> Any:
    F = torch.nn.functional
    if name == "layernorm":  # over the channels: move them last
        h = a["h"].transpose(1, 2)
        return F.layer_norm(h, h.shape[-1:], a["weight"], a["bias"], 1e-5).transpose(1, 2)
    if name == "gate":
        return a["x"] * torch.sigmoid(a["t"])
    if name == "whiten":
        return a["u"] - a["u"].mean(dim=-1, keepdim=True)
    return torch.einsum("bn,bcn->bc", torch.softmax(a["logits"][:, 0], -1), a["values"])[..., None]


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_matches_torch_autograd(name: str, torch: Any) -> None:
    forward, backward, inputs = LAYERS[name]
    out, cache = forward(inputs)
    dout = RNG.standard_normal(out.shape)
    grads = backward(dout, cache)
    tensors = {n: torch.tensor(v, requires_grad=True) for n, v in inputs.items()}
    ref = _torch_layer(name, torch, tensors)
    ref.backward(torch.tensor(dout))
    np.testing.assert_allclose(out, ref.detach().numpy(), rtol=0, atol=1e-13)
    for n, t in tensors.items():
        np.testing.assert_allclose(grads[n], t.grad.numpy(), rtol=0, atol=1e-13, err_msg=n)


def test_layernorm_normalises_each_position_over_channels() -> None:
    out, _ = layernorm.forward(X * 100 + 3, np.ones(5), np.zeros(5), eps=0.0)
    np.testing.assert_allclose(out.mean(axis=1), 0, atol=1e-13)
    np.testing.assert_allclose(out.var(axis=1), 1, atol=1e-12)


def test_gate_is_stable_and_exact_at_extremes() -> None:
    t = np.array([[[-1000.0], [-40.0], [0.0], [40.0], [1000.0]]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning from exp
        z, cache = gate.forward(np.ones((1, 5, 2)), t)
        dx, dt = gate.backward(np.ones((1, 5, 2)), cache)
    assert z[0, :, 0].tolist() == [0.0, pytest.approx(4.248e-18, rel=1e-3), 0.5, 1.0, 1.0]
    assert np.all(np.isfinite(dt)) and dt[0, 0, 0] == 0.0 and dt[0, 2, 0] == 0.5  # 2 · σ'(0)
    np.testing.assert_array_equal(dx, z)


def test_whiten_is_a_projection() -> None:
    out, cache = whiten.forward(X)
    np.testing.assert_allclose(out.mean(axis=-1), 0, atol=1e-15)
    np.testing.assert_allclose(cache.mean[..., 0], X.mean(axis=-1))
    np.testing.assert_allclose(whiten.forward(out)[0], out, atol=1e-15)  # idempotent
    np.testing.assert_allclose(whiten.backward(X, cache), out, atol=1e-15)  # self-adjoint


def test_attention_pool_weights_are_one_softmax_row() -> None:
    c, cache = attention_pool.forward(LOGITS, X)
    assert cache.weights.shape == (2, 1, 6)
    np.testing.assert_allclose(cache.weights.sum(axis=-1), 1.0)
    np.testing.assert_allclose(c[..., 0], np.einsum("bn,bcn->bc", cache.weights[:, 0], X))
    flat, _ = attention_pool.forward(np.zeros_like(LOGITS), X)  # equal logits: the mean
    np.testing.assert_allclose(flat[..., 0], X.mean(axis=-1), atol=1e-15)


def test_layernorm_float32_finite_up_to_float32_max() -> None:
    """A column of C = 4 channels with σ² = 3e38 (finite in float32) has Σ(h − μ)² = 1.2e39
    (not): the output and every gradient stay finite, with no overflow even in a temporary,
    and match the same layer in float64. Columns with small variances share the input."""
    variances = np.array([3e38, 1e37, 1e30, 1.0])  # one per position n
    z = np.random.default_rng(3).standard_normal((2, 4, 4))
    z -= z.mean(axis=1, keepdims=True)
    z /= np.sqrt((z**2).mean(axis=1, keepdims=True))  # each column: mean 0, variance 1
    spread = np.sqrt(variances)[None, None, :]
    h = (z * spread + 0.5 * spread).astype(np.float32)
    dout = RNG.standard_normal(h.shape).astype(np.float32)
    gamma, beta = GAMMA[:4].astype(np.float32), BETA[:4].astype(np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        out, cache = layernorm.forward(h, gamma, beta, 1e-5)
        grads = layernorm.backward(dout, cache)
    deviations = h.astype(np.float64) - h.astype(np.float64).mean(axis=1, keepdims=True)
    assert np.all(np.sum(deviations**2, axis=1)[:, 0] > np.finfo(np.float32).max)  # overflows
    out64, cache64 = layernorm.forward(*(a.astype(np.float64) for a in (h, gamma, beta)), 1e-5)
    grads64 = layernorm.backward(dout.astype(np.float64), cache64)
    got = {"out": out, "dh": grads.dh, "dweight": grads.dweight, "dbias": grads.dbias}
    want = {"out": out64, "dh": grads64.dh, "dweight": grads64.dweight, "dbias": grads64.dbias}
    for name, value in want.items():
        assert got[name].dtype == np.float32 and np.all(np.isfinite(got[name])), name
        scale = float(np.max(np.abs(value)))
        np.testing.assert_allclose(got[name], value, rtol=2e-5, atol=2e-5 * scale, err_msg=name)
