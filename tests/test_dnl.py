"""The disentangled non-local block: config, initialisation, gradient checks on every
backend, and the independent PyTorch autograd reference (tests/family_reference.py)."""

from __future__ import annotations

import itertools
import re
from typing import Any

import numpy as np
import pytest

import nlref
from nlref import family
from nlref.family import DNLConfig, dnl

from .conftest import require
from .family_reference import (
    assert_backend_equals_numpy,
    assert_float32_path,
    autograd,
    gradcheck_block,
    torch_dnl,
)

SHAPES = {1: (2, 6, 8), 2: (2, 6, 4, 5), 3: (2, 6, 2, 4, 4)}
KERNELS = {1: (2,), 2: (2, 2), 3: (1, 2, 2)}
# scale × temperature × sub_sample × norm; each option on 1-D, 2-D and 3-D inputs
OPTIONS = list(itertools.product((None, 0.5), (1.0, 0.3), (False, True), ("batchnorm", None)))


def _ids(option: tuple) -> str:
    scale, temperature, sub_sample, norm = option
    return f"s{scale}-t{temperature}-{'pool' if sub_sample else 'full'}-{norm}"


def _case(option: tuple, dims: int, pool_order: str = "after_projection", seed: int = 0) -> tuple:
    scale, temperature, sub_sample, norm = option
    cfg = DNLConfig(
        6, 3, scale=scale, temperature=temperature, norm=norm, pool_order=pool_order,
        sub_sample=KERNELS[dims] if sub_sample else None,
    )  # fmt: skip
    params = family.init_params(cfg, rng=seed, scheme="random")
    x = np.random.default_rng(seed + 1).standard_normal(SHAPES[dims])
    return cfg, params, x


def _pool_order(i: int) -> str:
    return ("after_projection", "before_projection")[i % 2]


# ─── Config and parameters ────────────────────────────────────────────────────────────────


def test_config_builds_its_nonlocal_part() -> None:
    cfg = DNLConfig(64, scale=0.5, temperature=0.25, sub_sample=[2, 2], biases=("g", "theta"))
    assert (cfg.inter_channels, cfg.sub_sample, cfg.biases) == (32, (2, 2), ("theta", "g"))
    assert cfg.effective_scale == 2.0
    block = cfg.nonlocal_config
    assert (block.pairwise, block.scale, block.sub_sample, block.biases) == (
        "embedded_gaussian", 2.0, (2, 2), ("theta", "g"),
    )  # fmt: skip
    assert DNLConfig(8).effective_scale == 1.0 and DNLConfig(8) == DNLConfig(8, temperature=1)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"temperature": 0}, ValueError, "temperature must be a finite positive float, got 0"),
        ({"temperature": True}, TypeError, "temperature must be a finite positive float, got True"),
        (
            {"scale": 1e300, "temperature": 1e-300},
            ValueError,
            "scale / temperature must be finite, got inf (scale=1e+300, temperature=1e-300)",
        ),
        # the fields shared with the Non-local block are checked by NonLocalConfig
        ({"scale": -1.0}, ValueError, "scale must be a finite positive float, got -1.0"),
        ({"sub_sample": 2}, TypeError, "sub_sample must be None or one int per spatial dim"),
        ({"norm": "layernorm"}, ValueError, "norm must be one of"),
    ],
)
def test_config_errors(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        DNLConfig(**{"in_channels": 8, **kwargs})


def test_param_shapes_put_the_mask_after_g() -> None:
    cfg = DNLConfig(8, 4, norm=None)
    assert list(family.param_shapes(cfg)) == [
        "theta.weight", "theta.bias", "phi.weight", "phi.bias", "g.weight", "g.bias",
        "mask.weight", "mask.bias", "z.weight", "z.bias",
    ]  # fmt: skip
    assert family.param_shapes(cfg)["mask.weight"] == (1, 8)
    assert "bn.running_var" not in family.trainable_names(DNLConfig(8))


@pytest.mark.parametrize("norm", ["batchnorm", None])
def test_paper_init_is_the_identity(norm: str | None) -> None:
    cfg = DNLConfig(8, sub_sample=(2, 2), norm=norm, temperature=0.05)
    params = family.init_params(cfg, rng=0)
    x = np.random.default_rng(1).standard_normal((2, 8, 4, 6))
    z, _ = dnl.forward(x, params, cfg)
    np.testing.assert_array_equal(z, x)  # BN γ = 0, or W_z = 0 without BN
    assert not np.any(params["mask.bias"]) and np.std(params["mask.weight"]) < 0.03


# ─── Gradients and references ─────────────────────────────────────────────────────────────


@pytest.mark.parametrize("index", range(len(OPTIONS)), ids=[_ids(o) for o in OPTIONS])
def test_gradcheck(index: int, xp: Any) -> None:
    dims = 1 + index % 3  # every option on one of the three shapes, both pool orders
    cfg, params, x = _case(OPTIONS[index], dims, _pool_order(index // 3))
    gradcheck_block(dnl, x, params, cfg, xp)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("option", OPTIONS, ids=_ids)
def test_matches_torch_autograd_reference(option: tuple, dims: int, torch: Any) -> None:
    for i, training in enumerate((True, False)):
        cfg, params, x = _case(option, dims, _pool_order(dims + i), seed=i)
        z, cache = dnl.forward(x, params, cfg, training)
        dz = np.random.default_rng(5).standard_normal(z.shape)
        dx, grads = dnl.backward(dz, cache)
        _, updated = torch_dnl(*_tensors(torch, x, params), cfg, training)
        z_ref, ref = autograd(
            lambda xt, pt, cfg=cfg, training=training: torch_dnl(xt, pt, cfg, training)[0],
            x, params, dz, buffers=nlref.BUFFERS,
        )  # fmt: skip
        np.testing.assert_allclose(z, z_ref, rtol=0, atol=1e-10)
        assert list(grads) == list(family.trainable_names(cfg))
        for name, g in {"x": dx, **grads}.items():
            np.testing.assert_allclose(g, ref[name], rtol=0, atol=1e-10, err_msg=name)
        assert set(cache.updated_buffers) == set(updated)
        for name, value in updated.items():
            np.testing.assert_allclose(cache.updated_buffers[name], value.numpy(), atol=1e-14)


def _tensors(torch: Any, x: np.ndarray, params: dict) -> tuple[Any, dict[str, Any]]:
    return torch.tensor(x), {n: torch.tensor(v) for n, v in params.items()}


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_torch_tensors_and_jax_arrays_equal_numpy(backend: str) -> None:
    require(backend)
    cfg, params, x = _case((0.5, 0.3, True, "batchnorm"), 2, "before_projection")
    assert_backend_equals_numpy(backend, dnl, x, params, cfg)


def test_float32_stays_float32_and_matches_float64() -> None:
    cfg, params, x = _case((0.5, 0.3, True, "batchnorm"), 2)
    cache = assert_float32_path(dnl, x, params, cfg)
    p32 = {n: v.astype(np.float32) for n, v in params.items()}
    updated = nlref.apply_buffer_updates(p32, cache)  # the new BN running statistics
    assert updated["bn.running_var"] is cache.updated_buffers["bn.running_var"]


# ─── What the two terms are ───────────────────────────────────────────────────────────────


def test_whitening_makes_the_query_and_key_biases_irrelevant() -> None:
    cfg, params, x = _case((None, 1.0, True, "batchnorm"), 2)
    z, cache = dnl.forward(x, params, cfg)
    shifted = {
        **params,
        "theta.bias": params["theta.bias"] + 3.0,
        "phi.bias": params["phi.bias"] - 2.0,
    }
    np.testing.assert_allclose(dnl.forward(x, shifted, cfg)[0], z, atol=1e-12)
    _, grads = dnl.backward(np.random.default_rng(0).standard_normal(z.shape), cache)
    assert np.abs(grads["theta.bias"]).max() < 1e-12 and np.abs(grads["phi.bias"]).max() < 1e-12
    assert np.abs(grads["mask.weight"]).max() > 1e-3  # the unary term still learns


@pytest.mark.parametrize("pool_order", ["after_projection", "before_projection"])
def test_unary_term_is_over_the_pooled_keys(pool_order: str) -> None:
    cfg, params, x = _case((None, 1.0, True, None), 2, pool_order)
    _, cache = dnl.forward(x, params, cfg)
    assert cache.attention.shape == (2, 20, 4) and cache.unary_attention.shape == (2, 1, 4)
    w, b = params["mask.weight"][0], params["mask.bias"][0]

    def pool(u: np.ndarray) -> np.ndarray:  # 2×2 max-pool of (B, C, 4, 5): floor to (2, 2)
        return u[..., :4, :4].reshape(*u.shape[:2], 2, 2, 2, 2).max(axis=(3, 5)).reshape(2, -1, 4)

    if pool_order == "before_projection":  # m = w_mᵀ P(x) + b_m
        m = np.einsum("c,bcn->bn", w, pool(x)[:, :, :]) + b
    else:  # m = P(w_mᵀ x + b_m)
        m = pool((np.einsum("c,bchw->bhw", w, x) + b)[:, None])[:, 0]
    u = np.exp(m - m.max(axis=-1, keepdims=True))
    np.testing.assert_allclose(cache.unary_attention[:, 0], u / u.sum(-1, keepdims=True))


def test_forward_and_backward_errors() -> None:
    cfg, params, x = _case((None, 1.0, True, None), 2)
    with pytest.raises(ValueError, match=re.escape("has 2 entries but x has 1 spatial dims")):
        dnl.forward(x.reshape(2, 6, 20), params, cfg)
    with pytest.raises(ValueError, match=re.escape("missing ['mask.weight', 'mask.bias']")):
        dnl.forward(x, {n: v for n, v in params.items() if not n.startswith("mask")}, cfg)
    z, cache = dnl.forward(x, params, cfg)
    _, gc_cache = family.gcnet.forward(x, *_gcnet_case())
    with pytest.raises(
        TypeError, match="cache must be the DNLCache returned by forward, got GCNet"
    ):
        dnl.backward(z, gc_cache)
    with pytest.raises(TypeError, match="dz must have the dtype of z"):
        dnl.backward(z.astype(np.float32), cache)


def _gcnet_case() -> tuple:
    cfg = family.GCNetConfig(6)
    return family.init_params(cfg), cfg
