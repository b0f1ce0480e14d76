"""Each layer and each pairwise variant on its own: forward values and gradient checks.

Every layer is checked entry by entry (``mode="elementwise"``), so a wrong gradient is
located, on every backend of the ``xp`` fixture. Data for max-pool are distinct values
spaced 0.1 apart (no ties); data for the concatenation ReLU are drawn away from 0.
"""

from __future__ import annotations

import array_api_compat
import numpy as np
import pytest

import nlref
from nlref.layers import aggregate, batchnorm, bilinear, maxpool, projection, softmax

from .grid import VARIANTS


def arr(xp, host):
    return xp.asarray(np.asarray(host, dtype=np.float64))


def check(forward, backward, inputs, **kw):
    result = nlref.gradcheck(forward, backward, inputs, mode="elementwise", **kw)
    assert result.ok
    return result


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_projection(xp, with_bias):
    rng = np.random.default_rng(0)
    inputs = {
        "x": arr(xp, rng.standard_normal((2, 4, 5))),
        "w": arr(xp, rng.standard_normal((3, 4))),
    }
    if with_bias:
        inputs["b"] = arr(xp, rng.standard_normal(3))

    def fwd(inp):
        return projection.forward(inp["x"], inp["w"], inp.get("b"))

    def bwd(du, cache):
        g = projection.backward(du, cache)
        grads = {"x": g.dx, "w": g.dweight}
        if g.dbias is not None:
            grads["b"] = g.dbias
        return grads

    check(fwd, bwd, inputs)
    out, _ = fwd(inputs)
    expected = np.einsum("oc,bcn->bon", nlref.to_numpy(inputs["w"]), nlref.to_numpy(inputs["x"]))
    if with_bias:
        expected += nlref.to_numpy(inputs["b"])[:, None]
    np.testing.assert_allclose(nlref.to_numpy(out), expected, rtol=1e-13, atol=1e-13)


def _tie_free(rng, shape):
    """Distinct values 0.1 apart in random order: no two entries of any window tie."""
    n = int(np.prod(shape))
    return (rng.permutation(n) * 0.1 - n * 0.05).reshape(shape)


@pytest.mark.parametrize(
    ("spatial", "kernel"),
    [
        ((7,), (2,)),
        ((5, 6), (2, 2)),
        ((5, 7), (2, 3)),
        ((3, 5, 4), (1, 2, 2)),
        ((4, 5, 3), (2, 2, 3)),
    ],
)
def test_maxpool_matches_definition_and_gradcheck(xp, spatial, kernel):
    rng = np.random.default_rng(1)
    host = _tie_free(rng, (2, 3, *spatial))
    x = arr(xp, host)
    out, _ = maxpool.forward(x, kernel)
    out_sp = tuple(s // k for s, k in zip(spatial, kernel, strict=True))
    assert tuple(out.shape) == (2, 3, *out_sp)
    # definition: max over each non-overlapping window, trailing remainder dropped (floor)
    for idx in np.ndindex(*out_sp):
        window = tuple(slice(i * k, (i + 1) * k) for i, k in zip(idx, kernel, strict=True))
        expected = host[(slice(None), slice(None), *window)].reshape(2, 3, -1).max(axis=-1)
        np.testing.assert_array_equal(
            nlref.to_numpy(out)[(slice(None), slice(None), *idx)], expected
        )
    check(
        lambda inp: maxpool.forward(inp["x"], kernel),
        lambda d, c: {"x": maxpool.backward(d, c)},
        {"x": x},
    )


def test_maxpool_gradient_goes_to_first_max_on_ties(xp):
    x = arr(xp, [[[1.0, 3.0, 3.0, 2.0, 5.0]]])  # window [3, 3] ties; 5 is dropped by the floor
    out, cache = maxpool.forward(x, (2,))
    np.testing.assert_array_equal(nlref.to_numpy(out), [[[3.0, 3.0]]])
    dx = maxpool.backward(arr(xp, [[[10.0, 20.0]]]), cache)
    np.testing.assert_array_equal(nlref.to_numpy(dx), [[[0.0, 10.0, 20.0, 0.0, 0.0]]])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batchnorm(xp, training):
    rng = np.random.default_rng(2)
    inputs = {
        "h": arr(xp, rng.standard_normal((3, 4, 5)) * 2 + 1),
        "gamma": arr(xp, rng.uniform(0.5, 1.5, 4)),
        "beta": arr(xp, rng.standard_normal(4)),
    }
    rm, rv = arr(xp, rng.standard_normal(4)), arr(xp, rng.uniform(0.5, 2, 4))

    def fwd(inp):
        return batchnorm.forward(inp["h"], inp["gamma"], inp["beta"], rm, rv, training=training)

    def bwd(d, cache):
        g = batchnorm.backward(d, cache)
        return {"h": g.dh, "gamma": g.dweight, "beta": g.dbias}

    check(fwd, bwd, inputs)
    out, cache = fwd(inputs)
    h = nlref.to_numpy(inputs["h"])
    if training:
        mean, var = h.mean(axis=(0, 2)), h.var(axis=(0, 2))
        m = h.shape[0] * h.shape[2]
        np.testing.assert_allclose(
            nlref.to_numpy(cache.running_var), 0.9 * nlref.to_numpy(rv) + 0.1 * var * m / (m - 1)
        )
        np.testing.assert_allclose(
            nlref.to_numpy(cache.running_mean), 0.9 * nlref.to_numpy(rm) + 0.1 * mean
        )
    else:
        mean, var = nlref.to_numpy(rm), nlref.to_numpy(rv)
    expected = (h - mean[:, None]) / np.sqrt(var[:, None] + 1e-5)
    expected = (
        expected * nlref.to_numpy(inputs["gamma"])[:, None]
        + nlref.to_numpy(inputs["beta"])[:, None]
    )
    np.testing.assert_allclose(nlref.to_numpy(out), expected, rtol=1e-12, atol=1e-12)


def test_batchnorm_training_refuses_one_value_per_channel(xp):
    h = arr(xp, np.ones((1, 2, 1)))
    one, zero = arr(xp, np.ones(2)), arr(xp, np.zeros(2))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batchnorm.forward(h, one, zero, zero, one, training=True)


def test_softmax(xp):
    rng = np.random.default_rng(3)
    s = arr(xp, rng.standard_normal((2, 3, 4)) * 3)
    p, _ = softmax.forward(s)
    np.testing.assert_allclose(nlref.to_numpy(xp.sum(p, axis=-1)), np.ones((2, 3)), rtol=1e-14)
    check(
        lambda inp: softmax.forward(inp["s"]), lambda d, c: {"s": softmax.backward(d, c)}, {"s": s}
    )


def test_engine_softmax_in_place_is_bitwise_the_layer(xp):
    """The engine's in-place softmax (forward, recompute from row statistics, backward) gives
    the layer's bits, also on logits far from 0; it works in the memory it is handed only on
    NumPy and CuPy."""
    from nlref.engine import inplace

    in_place = array_api_compat.is_numpy_namespace(xp) or array_api_compat.is_cupy_namespace(xp)
    rng = np.random.default_rng(5)
    s = arr(xp, rng.standard_normal((2, 6, 9)) * 40 + 300)
    p, cache = softmax.forward(s)
    scratch = s + 0.0
    again, stats = inplace.softmax_forward(scratch)
    assert np.array_equal(nlref.to_numpy(again), nlref.to_numpy(p))
    assert (again is scratch) == in_place
    assert tuple(stats.max.shape) == (2, 6, 1) == tuple(stats.inv_sum.shape)
    recomputed, same = inplace.softmax_forward(s + 0.0, stats)
    assert same is stats and np.array_equal(nlref.to_numpy(recomputed), nlref.to_numpy(p))
    dp = arr(xp, rng.standard_normal((2, 6, 9)))
    ds = softmax.backward(dp, cache)
    handed = dp + 0.0
    ds_engine = inplace.softmax_backward(handed, p)
    assert np.array_equal(nlref.to_numpy(ds_engine), nlref.to_numpy(ds))
    assert (ds_engine is handed) == in_place


def test_softmax_is_stable_for_huge_logits(xp):
    s = arr(xp, [[[1e4, 1e4 - 1.0, -1e4]]])
    p, _ = softmax.forward(s)
    e = np.exp([0.0, -1.0])
    np.testing.assert_allclose(nlref.to_numpy(p), [[[e[0] / e.sum(), e[1] / e.sum(), 0.0]]])


@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_bilinear(xp, scale):
    rng = np.random.default_rng(4)
    inputs = {
        "t": arr(xp, rng.standard_normal((2, 3, 5))),
        "p": arr(xp, rng.standard_normal((2, 3, 4))),
    }

    def bwd(d, c):
        dt, dp = bilinear.backward(d, c)
        return {"t": dt, "p": dp}

    check(lambda inp: bilinear.forward(inp["t"], inp["p"], scale), bwd, inputs)


def test_aggregate(xp):
    rng = np.random.default_rng(5)
    inputs = {
        "a": arr(xp, rng.standard_normal((2, 5, 4))),
        "g": arr(xp, rng.standard_normal((2, 3, 4))),
    }

    def bwd(d, c):
        da, dg = aggregate.backward(d, c)
        return {"a": da, "g": dg}

    check(lambda inp: aggregate.forward(inp["a"], inp["g"]), bwd, inputs)


@pytest.mark.parametrize("name", VARIANTS)
def test_pairwise_variant_alone(xp, name):
    variant = nlref.pairwise.get(name)
    rng = np.random.default_rng(6)
    ci = 3
    inputs = {
        "theta": arr(xp, rng.standard_normal((2, ci, 5))),
        "phi": arr(xp, rng.standard_normal((2, ci, 4))),
    }
    extra_shapes = variant.extra_params(ci)
    for key, shape in extra_shapes.items():
        inputs[key] = arr(xp, rng.standard_normal(shape))
    scale = 0.7 if variant.uses_scale else 1.0

    def fwd(inp):
        return variant.forward(inp["theta"], inp["phi"], {k: inp[k] for k in extra_shapes}, scale)

    def bwd(d, c):
        g = variant.backward(d, c)
        return {"theta": g.dtheta, "phi": g.dphi, **g.dextra}

    if "concat.weight" in extra_shapes:  # keep w_theta.theta_i + w_phi.phi_j away from 0
        for seed in range(100):
            w = nlref.to_numpy(inputs["concat.weight"])
            a = np.einsum("c,bcn->bn", w[:ci], nlref.to_numpy(inputs["theta"]))
            b = np.einsum("c,bcn->bn", w[ci:], nlref.to_numpy(inputs["phi"]))
            if np.abs(a[:, :, None] + b[:, None, :]).min() > 1e-3:
                break
            inputs["theta"] = arr(xp, np.random.default_rng(seed).standard_normal((2, ci, 5)))
    out, _ = fwd(inputs)
    assert tuple(out.shape) == (2, 5, 4)
    check(fwd, bwd, inputs)
