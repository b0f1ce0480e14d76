"""Inputs drawn away from the block's kinks: max-pool ties and the concatenation ReLU."""

from __future__ import annotations

import numpy as np
import pytest

import nlref


def test_margin_sees_a_max_pool_tie(xp):
    cfg = nlref.NonLocalConfig(
        in_channels=1,
        inter_channels=1,
        pairwise="gaussian",
        sub_sample=(2,),
        pool_order="before_projection",
    )
    params = nlref.init_params(cfg, rng=0, scheme="random", xp=xp)
    tied = xp.asarray(np.array([[[0.5, 0.5, 1.0, 3.0]]]))
    apart = xp.asarray(np.array([[[0.5, 0.7, 1.0, 3.0]]]))
    assert nlref.nonsmooth_margin(tied, params, cfg) == 0.0
    assert nlref.nonsmooth_margin(apart, params, cfg) == pytest.approx(0.2)


def test_margin_is_infinite_without_kinks(xp):
    cfg = nlref.NonLocalConfig(in_channels=3, pairwise="embedded_gaussian")
    params = nlref.init_params(cfg, rng=0, scheme="random", xp=xp)
    x = xp.asarray(np.random.default_rng(0).standard_normal((2, 3, 5)))
    assert nlref.nonsmooth_margin(x, params, cfg) == float("inf")


@pytest.mark.parametrize("order", ["after_projection", "before_projection"])
def test_drawn_concatenation_input_is_smooth_and_alive(xp, order):
    cfg = nlref.NonLocalConfig(
        in_channels=4,
        inter_channels=3,
        pairwise="concatenation",
        sub_sample=(2, 2),
        pool_order=order,
    )
    params, x = nlref.draw_smooth_case(cfg, (2, 4, 5, 6), rng=1, xp=xp, margin=1e-3)
    assert nlref.nonsmooth_margin(x, params, cfg) >= 1e-3
    _, cache = nlref.forward(x, params, cfg)
    active = (nlref.to_numpy(cache.attention) > 0).mean(axis=(1, 2))
    assert active.min() >= 0.1  # no sample with a (nearly) dead ReLU


def test_dead_relu_parameters_are_refused(xp):
    cfg = nlref.NonLocalConfig(in_channels=2, inter_channels=1, pairwise="concatenation")
    params = nlref.init_params(cfg, rng=0, scheme="random", xp=xp)
    params["theta.bias"] = xp.asarray(np.array([-100.0]))  # w_theta * b_theta dominates
    params["concat.weight"] = xp.asarray(np.array([1.0, 1.0]))
    with pytest.raises(RuntimeError, match="ReLUs active"):
        nlref.draw_smooth_input(cfg, params, (2, 2, 5), rng=0, max_tries=5)


def test_draws_follow_params_library_and_dtype(xp):
    cfg = nlref.NonLocalConfig(in_channels=4, pairwise="dot_product", sub_sample=(2,))
    params, x = nlref.draw_smooth_case(cfg, (2, 4, 6), rng=0, xp=xp, dtype="float32")
    assert x.dtype == xp.float32 and tuple(x.shape) == (2, 4, 6)
    assert type(x) is type(params["g.weight"])
