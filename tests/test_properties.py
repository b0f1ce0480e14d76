"""Properties every Non-local block must have, for every variant where they apply.

- a fresh ``scheme="paper"`` block is exactly the identity, with or without batch norm, in
  training and in eval mode;
- the attention has the documented normalisation: rows sum to 1 for the softmax variants,
  N′·A equals the un-normalised pairwise term for dot product and concatenation (N′
  counted after pooling);
- the embedded Gaussian is PyTorch's ``scaled_dot_product_attention`` of (θᵀ, φᵀ, gᵀ);
- float32 in gives float32 out, close to the float64 result;
- forward and backward mutate neither x nor the params; BN running statistics come back
  in ``cache.updated_buffers`` and :func:`nlref.apply_buffer_updates` returns a new dict;
- backward's gradients are keyed exactly by :func:`nlref.trainable_names`, in order.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import nlref

from . import grid
from .grid import (
    C_INTER,
    NORM_LAYERS,
    NOT_SOFTMAX_VARIANTS,
    SOFTMAX_VARIANTS,
    SUB_SAMPLES,
    VARIANTS,
    B,
    C,
    host,
)
from .torch_reference import torch_embeddings

SPATIAL = grid.SPATIAL[2][0]  # odd: max-pool floors
SHAPE = grid.shape(2)
NORMALISED_BY_N_KEYS = NOT_SOFTMAX_VARIANTS


def make_cfg(pairwise: str, sub: str = "full", norm: str | None = "batchnorm", **kw: Any) -> Any:
    """A 2D grid config (a non-trivial scale wherever one applies, unless given)."""
    return grid.config(pairwise, 2, sub, norm, **kw)


def random_setup(cfg: Any, xp: Any, seed: int = 0, dtype: str = "float64") -> tuple[Any, Any]:
    gen = np.random.default_rng(seed)
    params, x = nlref.draw_smooth_case(cfg, SHAPE, rng=gen, xp=xp, dtype=dtype)
    return x, params


# --- NumPy re-derivation of the embeddings (for the normalisation checks) -----------------


def np_pool(u: np.ndarray, kernel: tuple[int, ...] | None) -> np.ndarray:
    """Max-pool (B, C, *S) with kernel = stride, floor on odd sizes."""
    if kernel is None:
        return u
    b, c, *spatial = u.shape
    out = [s // k for s, k in zip(spatial, kernel, strict=True)]
    u = u[(slice(None), slice(None), *(slice(0, o * k) for o, k in zip(out, kernel, strict=True)))]
    u = u.reshape(b, c, *[n for o, k in zip(out, kernel, strict=True) for n in (o, k)])
    return u.max(axis=tuple(3 + 2 * i for i in range(len(kernel))))


def np_conv(params: dict[str, np.ndarray], layer: str, u: np.ndarray) -> np.ndarray:
    out = np.einsum("oc,bc...->bo...", params[f"{layer}.weight"], u)
    bias = params.get(f"{layer}.bias")
    if bias is not None:
        out = out + bias.reshape(1, -1, *([1] * (u.ndim - 2)))
    return out


def np_theta_phi(x: np.ndarray, params: dict[str, np.ndarray], cfg: Any) -> tuple[Any, Any]:
    """θ (B, C′, N) and φ (B, C′, N′) computed directly in NumPy."""
    kernel = cfg.sub_sample
    theta = np_conv(params, "theta", x)
    if kernel is not None and cfg.pool_order == "before_projection":
        phi = np_conv(params, "phi", np_pool(x, kernel))
    else:
        phi = np_pool(np_conv(params, "phi", x), kernel)
    return theta.reshape(B, C_INTER, -1), phi.reshape(B, C_INTER, -1)


# --- a fresh block is the identity ------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("norm", list(NORM_LAYERS.values()), ids=list(NORM_LAYERS))
@pytest.mark.parametrize("sub", list(SUB_SAMPLES))
@pytest.mark.parametrize("pairwise", VARIANTS)
def test_fresh_block_is_identity(
    pairwise: str, sub: str, norm: str | None, training: bool, xp: Any
) -> None:
    cfg = make_cfg(pairwise, sub, norm)
    params = nlref.init_params(cfg, rng=3, scheme="paper", xp=xp)
    x = xp.asarray(np.random.default_rng(4).standard_normal(SHAPE), dtype=xp.float64)
    z, cache = nlref.forward(x, params, cfg, training=training)
    np.testing.assert_array_equal(host(z), host(x))
    # the pairwise part is live: the identity comes from the zero γ (or W_z), not from A = 0
    assert float(np.max(np.abs(host(cache.attention)))) > 0
    # and the gradient reaches the gate (γ, or W_z without a norm) that opens the block
    dz = xp.asarray(np.random.default_rng(5).standard_normal(SHAPE), dtype=xp.float64)
    _, grads = nlref.backward(dz, cache)
    gate = "bn.weight" if norm == "batchnorm" else "z.weight"
    assert float(np.max(np.abs(host(grads[gate])))) > 0


# --- attention normalisation ---------------------------------------------------------


@pytest.mark.parametrize("sub", list(SUB_SAMPLES))
@pytest.mark.parametrize("pairwise", SOFTMAX_VARIANTS)
def test_softmax_rows_sum_to_one(pairwise: str, sub: str, xp: Any) -> None:
    cfg = make_cfg(pairwise, sub)
    x, params = random_setup(cfg, xp)
    _, cache = nlref.forward(x, params, cfg)
    attention = host(cache.attention)
    n_keys = grid.n_keys(sub)
    assert attention.shape == (B, math.prod(SPATIAL), n_keys)
    assert np.all(attention > 0)
    np.testing.assert_allclose(attention.sum(axis=-1), 1.0, rtol=0, atol=1e-14)


@pytest.mark.parametrize("sub", list(SUB_SAMPLES))
def test_gaussian_attention_is_softmax_of_raw_inputs(sub: str, xp: Any) -> None:
    cfg = make_cfg("gaussian", sub)
    x, params = random_setup(cfg, xp)
    _, cache = nlref.forward(x, params, cfg)
    hx = host(x)
    theta = hx.reshape(B, C, -1)
    phi = np_pool(hx, cfg.sub_sample).reshape(B, C, -1)  # C channels, not C′
    logits = cfg.effective_scale * np.einsum("bci,bcj->bij", theta, phi)
    expected = np.exp(logits - logits.max(axis=-1, keepdims=True))
    expected /= expected.sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(host(cache.attention), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("sub", list(SUB_SAMPLES))
@pytest.mark.parametrize("pairwise", NORMALISED_BY_N_KEYS)
def test_attention_is_normalised_by_key_count(pairwise: str, sub: str, xp: Any) -> None:
    cfg = make_cfg(pairwise, sub)
    x, params = random_setup(cfg, xp)
    _, cache = nlref.forward(x, params, cfg)
    hp = {n: host(v) for n, v in params.items()}
    theta, phi = np_theta_phi(host(x), hp, cfg)
    n_keys = phi.shape[-1]
    assert n_keys == grid.n_keys(sub)  # after pooling
    if pairwise == "dot_product":
        unnormalised = cfg.effective_scale * np.einsum("bci,bcj->bij", theta, phi)
    elif pairwise == "concatenation":
        w = hp["concat.weight"]
        pre = (
            np.einsum("c,bci->bi", w[:C_INTER], theta)[:, :, None]
            + np.einsum("c,bcj->bj", w[C_INTER:], phi)[:, None, :]
        )
        unnormalised = np.maximum(pre, 0.0)
        assert np.any(pre < 0) and np.any(pre > 0)  # the ReLU really cuts something
    else:  # a new variant must say here what its C(x) is
        pytest.fail(f"no normalisation check written for pairwise={pairwise!r}")
    np.testing.assert_allclose(host(cache.attention) * n_keys, unnormalised, rtol=1e-12, atol=1e-13)


# --- embedded Gaussian == scaled_dot_product_attention -------------------------------


@pytest.mark.parametrize("scale", [None, 1 / math.sqrt(C_INTER)], ids=["unscaled", "rsqrt_ci"])
@pytest.mark.parametrize("sub", list(SUB_SAMPLES))
def test_embedded_gaussian_is_sdpa(sub: str, scale: float | None, xp: Any, torch: Any) -> None:
    import torch.nn.functional as F

    cfg = make_cfg("embedded_gaussian", sub, norm=None, scale=scale)
    x, params = random_setup(cfg, xp)
    z, cache = nlref.forward(x, params, cfg)

    tensors = {n: torch.tensor(host(v), dtype=torch.float64) for n, v in params.items()}
    xt = torch.tensor(host(x), dtype=torch.float64)
    theta, phi, g, _ = torch_embeddings(xt, tensors, cfg)  # (B, C', N), (B, C', N')
    y = F.scaled_dot_product_attention(
        theta.transpose(1, 2),
        phi.transpose(1, 2),
        g.transpose(1, 2),
        scale=cfg.effective_scale,
    ).transpose(1, 2)  # (B, C', N)
    wy = torch.einsum("oc,bcn->bon", tensors["z.weight"], y) + tensors["z.bias"][:, None]
    z_sdpa = (wy + xt.flatten(2)).reshape(SHAPE)

    np.testing.assert_allclose(host(z), z_sdpa.numpy(), rtol=1e-10, atol=1e-10)
    # y itself, through the attention nlref returns: y = g Aᵀ
    y_nlref = np.einsum("bij,bcj->bci", host(cache.attention), g.numpy())
    np.testing.assert_allclose(y_nlref, y.numpy(), rtol=1e-10, atol=1e-10)


# --- float32 ------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("sub", ["pool_after", "pool_before"])
@pytest.mark.parametrize("pairwise", VARIANTS)
def test_float32_in_float32_out(pairwise: str, sub: str, training: bool, xp: Any) -> None:
    cfg = make_cfg(pairwise, sub)
    x32, p32 = random_setup(cfg, xp, dtype="float32")
    assert x32.dtype == xp.float32
    assert all(v.dtype == xp.float32 for v in p32.values())
    dz32 = xp.asarray(np.random.default_rng(9).standard_normal(SHAPE), dtype=xp.float32)
    z32, cache32 = nlref.forward(x32, p32, cfg, training=training)
    dx32, g32 = nlref.backward(dz32, cache32)

    # the same (float32-representable) inputs, computed in float64
    x64 = xp.astype(x32, xp.float64)
    p64 = {n: xp.astype(v, xp.float64) for n, v in p32.items()}
    z64, cache64 = nlref.forward(x64, p64, cfg, training=training)
    dx64, g64 = nlref.backward(xp.astype(dz32, xp.float64), cache64)

    got = {"z": z32, "attention": cache32.attention, "dx": dx32, **g32, **cache32.updated_buffers}
    want = {"z": z64, "attention": cache64.attention, "dx": dx64, **g64, **cache64.updated_buffers}
    assert list(got) == list(want)
    assert set(cache32.updated_buffers) == (set(nlref.BUFFERS) if training else set())
    # float32 rounding error scales with the magnitude of what is summed, not with the result:
    # some gradients are exactly 0 in exact arithmetic (φ's bias under a softmax, g's bias
    # under training-mode BN), so their absolute tolerance comes from the gradients' scale
    scale = grid.scales({k: host(v) for k, v in want.items()}, ["dx", *g64])
    for key, value in got.items():
        assert value.dtype == xp.float32, key
        assert want[key].dtype == xp.float64, key
        np.testing.assert_allclose(
            host(value), host(want[key]), rtol=1e-4, atol=1e-5 * scale[key], err_msg=key
        )


# --- no mutation; buffer updates --------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("norm", list(NORM_LAYERS.values()), ids=list(NORM_LAYERS))
@pytest.mark.parametrize("pairwise", VARIANTS)
def test_no_mutation_and_buffer_updates(
    pairwise: str, norm: str | None, training: bool, xp: Any
) -> None:
    cfg = make_cfg(pairwise, "pool_after", norm)
    x, params = random_setup(cfg, xp)
    dz = xp.asarray(np.random.default_rng(11).standard_normal(SHAPE), dtype=xp.float64)
    x_before = host(x)
    params_before = {n: host(v) for n, v in params.items()}
    dz_before = host(dz)
    keys_before = list(params)

    z, cache = nlref.forward(x, params, cfg, training=training)
    dx, grads = nlref.backward(dz, cache)

    np.testing.assert_array_equal(host(x), x_before)
    np.testing.assert_array_equal(host(dz), dz_before)
    assert list(params) == keys_before
    for name, before in params_before.items():
        np.testing.assert_array_equal(host(params[name]), before, err_msg=name)
    assert not np.array_equal(host(z), x_before)  # the random block is not the identity

    if norm == "batchnorm" and training:
        assert tuple(cache.updated_buffers) == nlref.BUFFERS
        for name in nlref.BUFFERS:
            new = host(cache.updated_buffers[name])
            assert new.shape == (C,) and new.dtype == np.float64
            assert not np.allclose(new, params_before[name]), name  # really updated
    else:
        assert cache.updated_buffers == {}

    updated = nlref.apply_buffer_updates(params, cache)
    assert updated is not params
    assert list(updated) == keys_before
    for name in params:
        if name in cache.updated_buffers:
            np.testing.assert_array_equal(
                host(updated[name]), host(cache.updated_buffers[name]), err_msg=name
            )
        else:
            assert updated[name] is params[name], name
    # apply_buffer_updates left params alone
    for name, before in params_before.items():
        np.testing.assert_array_equal(host(params[name]), before, err_msg=name)

    # a second forward from the updated params moves the running mean again, toward the
    # same batch mean (momentum m: new = (1-m) old + m batch)
    if norm == "batchnorm" and training:
        _, cache2 = nlref.forward(x, updated, cfg, training=True)
        m = cfg.bn_momentum
        mean1 = host(cache.updated_buffers["bn.running_mean"])
        mean0 = params_before["bn.running_mean"]
        batch_mean = (mean1 - (1 - m) * mean0) / m
        np.testing.assert_allclose(
            host(cache2.updated_buffers["bn.running_mean"]),
            (1 - m) * mean1 + m * batch_mean,
            rtol=1e-12,
            atol=1e-12,
        )
    assert host(dx).shape == SHAPE and set(grads) == set(nlref.trainable_names(cfg))


# --- gradient keys ------------------------------------------------------------------


@pytest.mark.parametrize("biases", [nlref.config.BIAS_LAYERS, ("g",), ()], ids=["all", "g", "none"])
@pytest.mark.parametrize("norm", list(NORM_LAYERS.values()), ids=list(NORM_LAYERS))
@pytest.mark.parametrize("pairwise", VARIANTS)
def test_grad_keys_are_trainable_names_in_order(
    pairwise: str, norm: str | None, biases: tuple[str, ...], xp: Any
) -> None:
    cfg = make_cfg(pairwise, "pool_after", norm, biases=biases)
    x, params = random_setup(cfg, xp)
    _, cache = nlref.forward(x, params, cfg)
    dz = xp.asarray(np.random.default_rng(13).standard_normal(SHAPE), dtype=xp.float64)
    _, grads = nlref.backward(dz, cache)
    names = nlref.trainable_names(cfg)
    assert tuple(grads) == names
    # the canonical order is param_shapes' order minus the BN buffers
    assert names == tuple(n for n in nlref.param_shapes(cfg) if n not in nlref.BUFFERS)
    for layer in nlref.config.BIAS_LAYERS:
        if layer == "theta" and not nlref.pairwise.get(pairwise).embeds:
            continue
        if layer == "phi" and not nlref.pairwise.get(pairwise).embeds:
            continue
        assert (f"{layer}.bias" in grads) == (layer in biases)
    assert ("bn.weight" in grads) == (norm == "batchnorm")
    assert not any(n in grads for n in nlref.BUFFERS)
    for name, grad in grads.items():
        assert tuple(grad.shape) == tuple(params[name].shape), name
        assert grad.dtype == params[name].dtype, name
