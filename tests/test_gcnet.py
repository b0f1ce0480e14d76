"""GCNet's global context block: config, the paper's initialisation, gradient checks on every
backend, and the independent PyTorch autograd reference (tests/family_reference.py)."""

from __future__ import annotations

import itertools
import re
from typing import Any

import numpy as np
import pytest

import nlref
from nlref import family
from nlref.family import GCNetConfig, gcnet

from .conftest import require
from .family_reference import (
    assert_backend_equals_numpy,
    assert_float32_path,
    autograd,
    gradcheck_block,
    torch_gcnet,
)

FUSIONS = (("channel_add",), ("channel_mul",), ("channel_add", "channel_mul"))
OPTIONS = list(itertools.product(("att", "avg"), FUSIONS))
SHAPES = {1: (2, 6, 7), 2: (2, 6, 3, 4), 3: (2, 6, 2, 3, 2)}


def _case(pooling: str, fusion: tuple[str, ...], dims: int, seed: int = 0) -> tuple:
    cfg = GCNetConfig(6, 3, pooling=pooling, fusion=fusion)
    params = family.init_params(cfg, rng=seed, scheme="random")
    x = np.random.default_rng(seed + 1).standard_normal(SHAPES[dims])
    return cfg, params, x


def _ids(option: tuple) -> str:
    return f"{option[0]}-{'+'.join(f.split('_')[1] for f in option[1])}"


# ─── Config and parameters ────────────────────────────────────────────────────────────────


def test_config_defaults_and_canonical_fusion_order() -> None:
    cfg = GCNetConfig(64, fusion=["channel_mul", "channel_add"])
    assert (cfg.inter_channels, cfg.pooling, cfg.ln_eps) == (4, "att", 1e-5)  # ratio 1/16
    assert cfg.fusion == ("channel_add", "channel_mul")
    assert GCNetConfig(8).inter_channels == 1 and GCNetConfig(8).fusion == ("channel_add",)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"in_channels": 0}, ValueError, "in_channels must be >= 1, got 0"),
        ({"in_channels": 8.0}, TypeError, "in_channels must be an int, got 8.0"),
        ({"inter_channels": True}, TypeError, "inter_channels must be an int, got True"),
        ({"pooling": "max"}, ValueError, "pooling must be one of ('att', 'avg'), got 'max'"),
        (
            {"fusion": "channel_add"},
            TypeError,
            "fusion must be a tuple of names from ('channel_add', 'channel_mul'), "
            "e.g. ('channel_add',); got 'channel_add'",
        ),
        (
            {"fusion": ()},
            ValueError,
            "fusion must name one or both of ('channel_add', 'channel_mul'), got ()",
        ),
        (
            {"fusion": ("channel_add", "add")},
            ValueError,
            "fusion must name one or both of ('channel_add', 'channel_mul'), "
            "got ('channel_add', 'add')",
        ),
        ({"ln_eps": 0.0}, ValueError, "ln_eps must be a finite positive float, got 0.0"),
    ],
)
def test_config_errors(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        GCNetConfig(**{"in_channels": 8, **kwargs})


def test_param_shapes() -> None:
    shapes = family.param_shapes(GCNetConfig(8, 2, fusion=("channel_mul",)))
    assert shapes == {
        "mask.weight": (1, 8), "mask.bias": (1,),
        "channel_mul.fc1.weight": (2, 8), "channel_mul.fc1.bias": (2,),
        "channel_mul.norm.weight": (2,), "channel_mul.norm.bias": (2,),
        "channel_mul.fc2.weight": (8, 2), "channel_mul.fc2.bias": (8,),
    }  # fmt: skip
    avg = family.param_shapes(GCNetConfig(8, 2, pooling="avg", fusion=FUSIONS[2]))
    assert [n for n in avg if n.endswith("fc1.weight")] == [
        "channel_add.fc1.weight", "channel_mul.fc1.weight",
    ]  # fmt: skip
    assert "mask.weight" not in avg and family.trainable_names(GCNetConfig(8)) == tuple(
        family.param_shapes(GCNetConfig(8))
    )


@pytest.mark.parametrize("pooling", ["att", "avg"])
def test_paper_init_fresh_add_is_identity_and_fresh_mul_halves_x(pooling: str) -> None:
    x = np.random.default_rng(0).standard_normal((2, 32, 5, 4))
    for fusion, expected in zip(FUSIONS, (x, x / 2, x / 2), strict=True):
        cfg = GCNetConfig(32, pooling=pooling, fusion=fusion)
        params = family.init_params(cfg, rng=1)
        z, _ = gcnet.forward(x, params, cfg)
        np.testing.assert_array_equal(z, expected)  # W₂ = 0, b₂ = 0: t = 0 and σ(0) = 1/2
    params = family.init_params(GCNetConfig(512, 32, fusion=FUSIONS[2]), rng=0)
    assert not np.any(params["channel_mul.fc2.weight"]) and not np.any(
        params["channel_add.fc2.bias"]
    )
    assert np.std(params["mask.weight"]) == pytest.approx(np.sqrt(2 / 512), rel=0.1)  # Kaiming
    assert np.abs(params["channel_add.fc1.weight"]).max() <= 1 / np.sqrt(512)  # U(±1/√C)
    assert np.all(params["channel_add.norm.weight"] == 1)


# ─── Gradients and references ─────────────────────────────────────────────────────────────


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("option", OPTIONS, ids=_ids)
def test_gradcheck(option: tuple, dims: int, xp: Any) -> None:
    cfg, params, x = _case(*option, dims)
    gradcheck_block(gcnet, x, params, cfg, xp)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("option", OPTIONS, ids=_ids)
def test_matches_torch_autograd_reference(option: tuple, dims: int, torch: Any) -> None:
    cfg, params, x = _case(*option, dims)
    z, cache = gcnet.forward(x, params, cfg)
    dz = np.random.default_rng(5).standard_normal(z.shape)
    dx, grads = gcnet.backward(dz, cache)
    z_ref, ref = autograd(lambda xt, pt: torch_gcnet(xt, pt, cfg), x, params, dz)
    np.testing.assert_allclose(z, z_ref, rtol=0, atol=1e-10)
    assert list(grads) == list(params)
    for name, g in {"x": dx, **grads}.items():
        np.testing.assert_allclose(g, ref[name], rtol=0, atol=1e-10, err_msg=name)


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("option", [OPTIONS[2], OPTIONS[3]], ids=_ids)
def test_torch_tensors_and_jax_arrays_equal_numpy(backend: str, option: tuple) -> None:
    require(backend)
    cfg, params, x = _case(*option, 2)
    assert_backend_equals_numpy(backend, gcnet, x, params, cfg)


def test_float32_stays_float32_and_matches_float64() -> None:
    cfg, params, x = _case("att", FUSIONS[2], 2)
    assert_float32_path(gcnet, x, params, cfg)


def test_cache_shows_the_one_attention_map() -> None:
    cfg, params, x = _case("att", FUSIONS[0], 2)
    _, cache = gcnet.forward(x, params, cfg)
    assert cache.attention.shape == (2, 1, 12) and cache.global_context.shape == (2, 6, 1)
    np.testing.assert_allclose(cache.attention.sum(axis=-1), 1.0)
    assert nlref.apply_buffer_updates(params, cache) == params  # no buffers to update
    cfg, params, x = _case("avg", FUSIONS[0], 2)
    _, cache = gcnet.forward(x, params, cfg)
    with pytest.raises(AttributeError, match=re.escape('pooling="avg" has no attention map')):
        _ = cache.attention


# ─── Errors at the boundary ───────────────────────────────────────────────────────────────


def test_forward_and_backward_errors() -> None:
    cfg, params, x = _case("att", FUSIONS[0], 2)
    with pytest.raises(TypeError, match="cfg must be a GCNetConfig or a DNLConfig, got NonLocal"):
        gcnet.forward(x, params, nlref.NonLocalConfig(6))
    with pytest.raises(ValueError, match=re.escape("GCNetConfig: missing ['mask.bias']. Expected")):
        gcnet.forward(x, {n: v for n, v in params.items() if n != "mask.bias"}, cfg)
    bad = {**params, "mask.weight": np.zeros((6, 1))}
    with pytest.raises(ValueError, match=re.escape("'mask.weight' must have shape (1, 6)")):
        gcnet.forward(x, bad, cfg)
    with pytest.raises(TypeError, match="does not promote silently"):
        gcnet.forward(x.astype(np.float32), params, cfg)
    masked = {**params, "mask.weight": np.ma.masked_array(params["mask.weight"])}
    with pytest.raises(TypeError, match=re.escape("'mask.weight' is a numpy.ma.MaskedArray")):
        gcnet.forward(x, masked, cfg)  # the Non-local block's checks, with its messages
    with pytest.raises(ValueError, match=re.escape("channel mismatch (5 != cfg.in_channels=6)")):
        gcnet.forward(x[:, :5], params, cfg)
    with pytest.raises(TypeError, match="training must be a bool, got 1"):
        gcnet.forward(x, params, cfg, training=1)
    z, cache = gcnet.forward(x, params, cfg)
    with pytest.raises(TypeError, match="cache must be the GCNetCache returned by forward"):
        gcnet.backward(z, (cache,))
    with pytest.raises(ValueError, match="dz must have the shape of z"):
        gcnet.backward(z[:1], cache)
