"""``nlref.gradcheck`` itself: it must pass right gradients and catch every kind of wrong one."""

from __future__ import annotations

import numpy as np
import pytest

import nlref
from nlref.layers import projection


def arr(xp, host, dtype=np.float64):
    return xp.asarray(np.asarray(host, dtype=dtype))


def inputs_for(xp, rng=0):
    r = np.random.default_rng(rng)
    return {"x": arr(xp, r.standard_normal((2, 4, 5))), "w": arr(xp, r.standard_normal((3, 4)))}


def fwd(inp):
    return projection.forward(inp["x"], inp["w"])


def bwd(du, cache):
    g = projection.backward(du, cache)
    return {"x": g.dx, "w": g.dweight}


@pytest.mark.parametrize("mode", ["directions", "elementwise", "jacobian"])
def test_correct_backward_passes_in_every_mode(xp, mode):
    result = nlref.gradcheck(fwd, bwd, inputs_for(xp), mode=mode)
    assert result.ok
    assert set(result.args) == {"x", "w"}
    assert result.max_rel_err < 1e-7
    assert "PASS" in str(result)


def test_wrong_gradient_is_caught_named_and_located(xp):
    def bad_bwd(du, cache):
        grads = bwd(du, cache)
        host = nlref.to_numpy(grads["w"]).copy()
        host[1, 2] += 0.5  # one wrong entry
        return {"x": grads["x"], "w": arr(xp, host)}

    with pytest.raises(nlref.GradcheckError) as info:
        nlref.gradcheck(fwd, bad_bwd, inputs_for(xp))
    result = info.value.result
    assert result.args["x"].passed
    assert not result.args["w"].passed
    assert result.args["w"].where == (1, 2)  # localised by the element-wise re-check
    message = str(info.value)
    assert "w" in message and "FAIL" in message and "(1, 2)" in message


def test_transposed_gradient_is_caught_with_random_upstream(xp):
    """A transposition bug that an all-ones upstream gradient would hide."""

    def transposed_bwd(du, cache):
        grads = bwd(du, cache)
        # sum_b du_b x_b^T is right; using du summed over positions times x summed is not
        xp_ = nlref._backend.namespace(du)
        wrong = xp_.sum(du, axis=(0, 2))[:, None] * xp_.sum(cache.x, axis=(0, 2))[None, :] / 5
        return {"x": grads["x"], "w": wrong}

    result = nlref.gradcheck(fwd, transposed_bwd, inputs_for(xp), raise_on_failure=False)
    assert not result.ok and not result.args["w"].passed


def test_refuses_float32(xp):
    inputs = {
        "x": arr(xp, np.ones((2, 4, 5)), np.float32),
        "w": arr(xp, np.ones((3, 4)), np.float32),
    }
    with pytest.raises(TypeError, match=r"float64.*float32.*'x'"):
        nlref.gradcheck(fwd, bwd, inputs)


def test_mutating_forward_is_caught():
    def mutating_fwd(inp):
        inp["x"][0, 0, 0] += 1.0  # mutates the caller's array in place
        return fwd(inp)

    result = nlref.gradcheck(mutating_fwd, bwd, inputs_for(np), raise_on_failure=False)
    assert not result.ok
    assert any("mutated" in f and "'x'" in f for f in result.failures)


def test_nonzero_gradient_for_zero_upstream_is_caught(xp):
    def leaky_bwd(du, cache):
        grads = bwd(du, cache)
        return {"x": grads["x"] + 1e-3, "w": grads["w"]}

    result = nlref.gradcheck(fwd, leaky_bwd, inputs_for(xp), raise_on_failure=False)
    assert any("zero upstream gradient" in f and "'x'" in f for f in result.failures)


def test_nondeterministic_backward_is_caught(xp):
    calls = {"n": 0}

    def flaky_bwd(du, cache):
        calls["n"] += 1
        grads = bwd(du, cache)
        return {"x": grads["x"] * (1 + 1e-15 * calls["n"]), "w": grads["w"]}

    result = nlref.gradcheck(fwd, flaky_bwd, inputs_for(xp), raise_on_failure=False)
    assert any("not deterministic" in f for f in result.failures)


def test_wrong_shape_or_dtype_gradient_is_caught(xp):
    def bad_shape(du, cache):
        grads = bwd(du, cache)
        return {"x": grads["x"], "w": nlref._backend.namespace(du).reshape(grads["w"], (4, 3))}

    result = nlref.gradcheck(fwd, bad_shape, inputs_for(xp), raise_on_failure=False)
    assert any("shape" in f and "'w'" in f for f in result.failures)

    def bad_dtype(du, cache):
        grads = bwd(du, cache)
        return {"x": grads["x"], "w": nlref._backend.namespace(du).astype(grads["w"], xp.float32)}

    result = nlref.gradcheck(fwd, bad_dtype, inputs_for(xp), raise_on_failure=False)
    assert any("dtype" in f and "'w'" in f for f in result.failures)


def test_missing_gradient_and_bad_arguments(xp):
    result = nlref.gradcheck(
        fwd, lambda d, c: {"x": bwd(d, c)["x"]}, inputs_for(xp), raise_on_failure=False
    )
    assert any("no gradient for 'w'" in f for f in result.failures)
    with pytest.raises(ValueError, match="mode"):
        nlref.gradcheck(fwd, bwd, inputs_for(xp), mode="sideways")
    with pytest.raises(ValueError, match="not inputs"):
        nlref.gradcheck(fwd, bwd, inputs_for(xp), wrt=["nope"])


def test_block_gradcheck_wrt_subset_and_jacobian_mode(xp):
    cfg = nlref.NonLocalConfig(in_channels=3, inter_channels=2, pairwise="dot_product", norm=None)
    params = nlref.init_params(cfg, rng=0, scheme="random", xp=xp)
    x = nlref.draw_smooth_input(cfg, params, (2, 3, 4), rng=0)
    result = nlref.gradcheck_block(cfg, x, params, mode="jacobian")
    assert result.ok and set(result.args) == {"x", *nlref.trainable_names(cfg)}
    sub = nlref.gradcheck_block(cfg, x, params, wrt=["g.weight"])
    assert list(sub.args) == ["g.weight"]
