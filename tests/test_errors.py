"""Bad input gets a clear ValueError or TypeError naming what was expected and what was given.

Never an IndexError or a broadcast error from deep inside.
"""

from __future__ import annotations

import numpy as np
import pytest

import nlref

from .conftest import require


def make(xp=None, dtype="float64", **cfg_kw):
    cfg_kw.setdefault("in_channels", 4)
    cfg = nlref.NonLocalConfig(**cfg_kw)
    params = nlref.init_params(cfg, rng=0, scheme="random", dtype=dtype, xp=xp)
    return cfg, params


def x_of(shape, xp=None, dtype=np.float64):
    host = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    return host if xp is None else xp.asarray(host)


# --- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"pairwise": "cosine"}, ValueError, r"unknown pairwise function 'cosine'.*gaussian"),
        ({"pool_order": "during"}, ValueError, r"pool_order must be one of .*'during'"),
        ({"norm": "layernorm"}, ValueError, r"norm must be one of .*'layernorm'"),
        ({"in_channels": 0}, ValueError, r"in_channels must be >= 1, got 0"),
        ({"in_channels": 4.0}, TypeError, r"in_channels must be an int"),
        ({"inter_channels": 0}, ValueError, r"inter_channels must be >= 1"),
        ({"sub_sample": 2}, TypeError, r"one int per spatial dim"),
        ({"sub_sample": (2, 0)}, ValueError, r"ints >= 1"),
        ({"sub_sample": (2, 2, 2, 2)}, ValueError, r"1 to 3 entries"),
        ({"scale": -1.0}, ValueError, r"finite positive"),
        ({"scale": float("nan")}, ValueError, r"finite positive"),
        ({"scale": "1"}, TypeError, r"scale must be a float"),
        ({"pairwise": "concatenation", "scale": 0.5}, ValueError, r"concatenation.*no θᵢᵀφⱼ"),
        ({"biases": ("theta", "psi")}, ValueError, r"unknown \['psi'\]"),
        ({"biases": "z"}, TypeError, r"tuple of layer names"),
        ({"bn_eps": 0.0}, ValueError, r"bn_eps"),
        ({"bn_momentum": 1.5}, ValueError, r"bn_momentum"),
    ],
)
def test_bad_config(kwargs, error, match):
    kwargs.setdefault("in_channels", 4)
    with pytest.raises(error, match=match):
        nlref.NonLocalConfig(**kwargs)


def test_bad_init_arguments():
    cfg = nlref.NonLocalConfig(in_channels=4)
    with pytest.raises(ValueError, match="scheme must be one of"):
        nlref.init_params(cfg, scheme="xavier")
    with pytest.raises(ValueError, match="dtype must be 'float32' or 'float64'"):
        nlref.init_params(cfg, dtype="float16")


# --- x -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 4), (4,), (2, 4, 3, 3, 3, 3)])
def test_wrong_ndim(shape):
    cfg, params = make()
    with pytest.raises(ValueError, match=r"expected x of shape \(B, C=4, \*S\).*got"):
        nlref.forward(x_of(shape), params, cfg)


def test_channel_mismatch():
    cfg, params = make()
    with pytest.raises(ValueError, match=r"C=4.*got \(2, 3, 5, 5\).*3 != cfg.in_channels=4"):
        nlref.forward(x_of((2, 3, 5, 5)), params, cfg)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_, np.complex128])
def test_non_float_dtype(dtype):
    cfg, params = make()
    x = np.ones((2, 4, 3, 3), dtype=dtype)
    with pytest.raises(TypeError, match=r"real floating dtype.*got"):
        nlref.forward(x, params, cfg)


def test_not_an_array():
    cfg, params = make()
    with pytest.raises(TypeError, match="x must be an array"):
        nlref.forward([[1.0, 2.0]], params, cfg)


def test_empty_batch():
    cfg, params = make()
    with pytest.raises(ValueError, match=r"must not be empty.*\(0, 4, 3, 3\)"):
        nlref.forward(np.ones((0, 4, 3, 3)), params, cfg)


def test_sub_sample_wrong_length():
    cfg, params = make(sub_sample=(2, 2))
    with pytest.raises(ValueError, match=r"sub_sample=\(2, 2\) has 2 entries but x has 3 spatial"):
        nlref.forward(x_of((2, 4, 4, 4, 4)), params, cfg)


def test_sub_sample_larger_than_spatial_dim():
    cfg, params = make(sub_sample=(2, 8))
    with pytest.raises(ValueError, match=r"larger than the spatial size S=\(4, 5\).*zero key"):
        nlref.forward(x_of((2, 4, 4, 5)), params, cfg)


def test_bn_training_with_one_value_per_channel():
    cfg, params = make()
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*B·N = 1"):
        nlref.forward(x_of((1, 4, 1)), params, cfg, training=True)
    z, _ = nlref.forward(x_of((1, 4, 1)), params, cfg, training=False)  # eval mode is fine
    assert z.shape == (1, 4, 1)


def test_training_must_be_bool():
    cfg, params = make()
    with pytest.raises(TypeError, match="training must be a bool"):
        nlref.forward(x_of((2, 4, 3)), params, cfg, training="yes")


def test_cfg_must_be_a_config():
    _, params = make()
    with pytest.raises(TypeError, match="cfg must be a NonLocalConfig"):
        nlref.forward(x_of((2, 4, 3)), params, {"in_channels": 4})


# --- params --------------------------------------------------------------------------------


def test_missing_parameter():
    cfg, params = make()
    del params["phi.weight"]
    with pytest.raises(ValueError, match=r"missing \['phi.weight'\]"):
        nlref.forward(x_of((2, 4, 3)), params, cfg)


def test_unexpected_parameter():
    cfg, params = make(pairwise="gaussian")
    params["theta.weight"] = np.zeros((2, 4))  # the Gaussian has no theta
    with pytest.raises(ValueError, match=r"unexpected \['theta.weight'\]"):
        nlref.forward(x_of((2, 4, 3)), params, cfg)


def test_bias_present_but_not_in_cfg_biases():
    cfg, params = make(biases=("theta", "phi", "g"))
    params["z.bias"] = np.zeros(4)
    with pytest.raises(ValueError, match=r"unexpected \['z.bias'\].*cfg.biases"):
        nlref.forward(x_of((2, 4, 3)), params, cfg)


def test_misshaped_parameter():
    cfg, params = make()
    params["g.weight"] = np.zeros((4, 2))
    with pytest.raises(ValueError, match=r"'g.weight' must have shape \(2, 4\).*got \(4, 2\)"):
        nlref.forward(x_of((2, 4, 3)), params, cfg)


def test_params_not_a_mapping():
    cfg, params = make()
    with pytest.raises(TypeError, match="params must be a mapping"):
        nlref.forward(x_of((2, 4, 3)), list(params.values()), cfg)


def test_param_not_an_array():
    cfg, params = make()
    params["g.bias"] = [0.0, 0.0]
    with pytest.raises(TypeError, match=r"'g.bias' must be an array"):
        nlref.forward(x_of((2, 4, 3)), params, cfg)


def test_param_dtype_differs_from_x():
    cfg, params = make(dtype="float32")
    with pytest.raises(
        TypeError, match=r"'theta.weight' has dtype float32 but x has dtype float64"
    ):
        nlref.forward(x_of((2, 4, 3)), params, cfg)


# --- namespaces ----------------------------------------------------------------------------


@pytest.fixture(params=["array_api_strict", pytest.param("cupy", marks=pytest.mark.gpu)])
def other_xp(request):
    """A library other than NumPy, to mix with NumPy arrays."""
    import array_api_compat

    module = require(request.param)
    return array_api_compat.array_namespace(module.empty(0)) if request.param == "cupy" else module


def test_params_from_another_library(other_xp):
    xp = other_xp
    cfg, params = make(xp=xp)
    with pytest.raises(TypeError, match=r"parameter 'theta.weight' is a .* array but x is a numpy"):
        nlref.forward(x_of((2, 4, 3)), params, cfg)


def test_dz_from_another_library(other_xp):
    xp = other_xp
    cfg, params = make(xp=xp)
    _, cache = nlref.forward(x_of((2, 4, 3), xp), params, cfg)
    with pytest.raises(TypeError, match="same array library"):
        nlref.backward(np.ones((2, 4, 3)), cache)


# --- dz ------------------------------------------------------------------------------------


def test_dz_wrong_shape():
    cfg, params = make()
    _, cache = nlref.forward(x_of((2, 4, 3)), params, cfg)
    with pytest.raises(ValueError, match=r"dz must have the shape of z, \(2, 4, 3\), got \(2, 4\)"):
        nlref.backward(np.ones((2, 4)), cache)


def test_dz_wrong_dtype():
    cfg, params = make()
    _, cache = nlref.forward(x_of((2, 4, 3)), params, cfg)
    with pytest.raises(TypeError, match="dz must have the dtype of z, float64, got float32"):
        nlref.backward(np.ones((2, 4, 3), dtype=np.float32), cache)


def test_backward_needs_the_block_cache():
    with pytest.raises(TypeError, match="BlockCache"):
        nlref.backward(np.ones((2, 4, 3)), {"attention": None})
