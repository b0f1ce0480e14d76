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


# --- the noise allowance is per argument ---------------------------------------------------


def large_output_case() -> tuple[nlref.NonLocalConfig, dict, np.ndarray]:
    """The embedded Gaussian on an input scaled by 30 (C = 16, 6×6): the residual path
    makes z, and the rounding bound 8ε Σ|dz·z|/h, large (3.7e-5), while θ's bias has a
    gradient of about 1e-2."""
    cfg = nlref.NonLocalConfig(in_channels=16, pairwise="embedded_gaussian")
    params = nlref.init_params(cfg, rng=29, scheme="random")
    x = np.random.default_rng(29).standard_normal((2, 16, 6, 6)) * 30
    return cfg, params, x


def block_check(cfg, params, x, factor: float, **kwargs) -> nlref.GradcheckResult:
    """gradcheck of the block with θ's bias gradient multiplied by ``factor``."""

    def fwd(inp):
        return nlref.forward(inp["x"], {n: inp[n] for n in params}, cfg, training=True)

    def bwd(dz, cache):
        dx, grads = nlref.backward(dz, cache)
        return {"x": dx, **grads, "theta.bias": grads["theta.bias"] * factor}

    kwargs.setdefault("wrt", ["x", *nlref.trainable_names(cfg)])
    return nlref.gradcheck(fwd, bwd, {"x": x, **params}, raise_on_failure=False, **kwargs)


@pytest.mark.parametrize("mode", ["directions", "elementwise"])
def test_small_wrong_gradient_cannot_hide_behind_a_large_output(mode):
    """θ's bias gradient 0.1 % off is caught, although the error (2.3e-5) is below the
    rounding bound of the whole output (3.7e-5): θ's bias moves the output far less than
    x does, and its own finite differences are accurate to about 1e-7."""
    cfg, params, x = large_output_case()
    wrong = block_check(cfg, params, x, 1.001, wrt=["theta.bias"], mode=mode)
    report = wrong.args["theta.bias"]
    assert not wrong.ok and not report.passed
    assert report.max_abs_err < wrong.noise  # hidden by the whole output's bound
    assert 0 < report.noise < report.max_abs_err / 10  # but not by its own allowance
    right = block_check(cfg, params, x, 1.0, wrt=["theta.bias"], mode=mode)
    assert right.ok, str(right)


def test_every_gradient_of_the_large_case_passes():
    cfg, params, x = large_output_case()
    result = block_check(cfg, params, x, 1.0)
    assert result.ok, str(result)
    assert list(result.args) == ["x", *nlref.trainable_names(cfg)]


def test_exactly_zero_gradient_passes_on_rounding_noise():
    """f = 10x + ((c + x)² − c² − 2cx): ∂f/∂c is exactly 0, but the finite differences
    along c see the rounding of (c + x)² ≈ 1e3, about 1e-6 in all (above atol). The
    allowance covers it; x, whose differences are accurate, needs none."""

    def fwd(inp):
        x, c = inp["x"], inp["c"]
        return 10 * x + ((c + x) ** 2 - c**2 - 2 * c * x), x

    def bwd(dout, x):
        return {"x": dout * (10 + 2 * x), "c": dout * 0.0}

    gen = np.random.default_rng(0)
    inputs = {"x": gen.standard_normal((4, 50)), "c": 30 + gen.standard_normal((4, 50))}
    result = nlref.gradcheck(fwd, bwd, inputs, raise_on_failure=False)
    assert result.ok, str(result)
    c = result.args["c"]
    assert c.max_abs_err > 1e-7 and 0 < c.noise <= result.noise
    assert result.args["x"].noise == 0
    assert nlref.gradcheck(fwd, bwd, inputs, mode="elementwise", raise_on_failure=False).ok


def test_report_is_a_table():
    result = nlref.gradcheck(fwd, bwd, inputs_for(np), raise_on_failure=False)
    lines = str(result).splitlines()
    assert lines[0] == "gradcheck (directions): PASS"
    at = next(i for i, line in enumerate(lines) if line.startswith("argument"))
    header, rule, rows = lines[at], lines[at + 1], lines[at + 2 :]
    columns = ["argument", "max abs err", "max rel err", "noise", "status", "where"]
    assert header.split() == " ".join(columns).split()
    assert set(rule) == {"-"} and len(rule) == max(len(line) for line in [header, *rows])
    assert [line.split()[0] for line in rows] == ["x", "w"]
    assert all(line == line.rstrip() and len(line) <= 100 for line in lines)
