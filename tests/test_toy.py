"""The toy long-range task: its extra layers, optimisers, models and the locality claim.

Every new layer (conv2d, relu, global_pool, linear, cross_entropy) is gradient-checked entry
by entry on each backend of the ``xp`` fixture and compared with an independent
computation; the optimisers are compared with torch.optim; the two toy models are
gradient-checked end to end; and the claim that the local baseline cannot solve the task
is checked exactly: its logits are additive in the two markers.

The full training run (accuracies with and without the block) is executed by
``notebooks/04_toy_task.ipynb`` in the test suite, not repeated here.
"""

from __future__ import annotations

import numpy as np
import pytest

import nlref
from nlref.demo import optim, toy
from nlref.demo.layers import conv2d, cross_entropy, linear
from nlref.layers import global_pool, relu

from .conftest import require


def arr(xp, host):
    return xp.asarray(np.asarray(host, dtype=np.float64))


def check(forward, backward, inputs, **kw):
    result = nlref.gradcheck(forward, backward, inputs, mode="elementwise", **kw)
    assert result.ok, str(result)
    return result


# ----------------------------------------------------------------------- layers


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_conv2d_gradcheck(xp, k, with_bias):
    rng = np.random.default_rng(k)
    inputs = {
        "x": arr(xp, rng.standard_normal((2, 3, 5, 4))),
        "w": arr(xp, rng.standard_normal((2, 3, k, k))),
    }
    if with_bias:
        inputs["b"] = arr(xp, rng.standard_normal(2))

    def fwd(inp):
        return conv2d.forward(inp["x"], inp["w"], inp.get("b"))

    def bwd(du, cache):
        g = conv2d.backward(du, cache)
        grads = {"x": g.dx, "w": g.dweight}
        if g.dbias is not None:
            grads["b"] = g.dbias
        return grads

    check(fwd, bwd, inputs)


def test_conv2d_matches_explicit_loops():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5, 6))
    w = rng.standard_normal((4, 3, 3, 3))
    b = rng.standard_normal(4)
    u, _ = conv2d.forward(x, w, b)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    expected = np.empty((2, 4, 5, 6))
    for i in range(5):
        for j in range(6):
            window = padded[:, :, i : i + 3, j : j + 3]  # (B, C, 3, 3)
            expected[:, :, i, j] = np.einsum("bcrs,ocrs->bo", window, w) + b
    np.testing.assert_allclose(u, expected, rtol=1e-13, atol=1e-13)


def test_conv2d_matches_torch(torch):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 6, 5))
    w = rng.standard_normal((4, 3, 3, 3))
    b = rng.standard_normal(4)
    u, _ = conv2d.forward(x, w, b)
    ref = torch.nn.functional.conv2d(
        torch.tensor(x), torch.tensor(w), torch.tensor(b), padding=1
    ).numpy()
    np.testing.assert_allclose(u, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "match"),
    [
        ((2, 3, 5), (2, 3, 3, 3), "expected x of shape"),
        ((2, 3, 5, 5), (2, 3, 2, 2), "k odd"),
        ((2, 3, 5, 5), (2, 4, 3, 3), "input channels"),
    ],
)
def test_conv2d_bad_shapes(x_shape, w_shape, match):
    with pytest.raises(ValueError, match=match):
        conv2d.forward(np.zeros(x_shape), np.zeros(w_shape))


def test_relu_gradcheck(xp):
    rng = np.random.default_rng(2)
    h = rng.standard_normal((3, 4, 5))
    h = np.where(np.abs(h) < 0.05, 0.5, h)  # away from the kink at 0
    check(
        lambda inp: relu.forward(inp["h"]),
        lambda d, c: {"h": relu.backward(d, c)},
        {"h": arr(xp, h)},
    )
    out, _ = relu.forward(arr(xp, h))
    np.testing.assert_array_equal(nlref.to_numpy(out), np.maximum(h, 0))


@pytest.mark.parametrize("spatial", [(5,), (3, 4), (2, 3, 2)], ids=["1d", "2d", "3d"])
def test_global_pool_gradcheck(xp, spatial):
    h = np.random.default_rng(3).standard_normal((2, 3, *spatial))
    check(
        lambda inp: global_pool.forward(inp["h"]),
        lambda d, c: {"h": global_pool.backward(d, c)},
        {"h": arr(xp, h)},
    )
    out, _ = global_pool.forward(arr(xp, h))
    np.testing.assert_allclose(
        nlref.to_numpy(out), h.reshape(2, 3, -1).mean(axis=2), rtol=1e-14, atol=1e-14
    )


def test_global_pool_needs_a_spatial_dim():
    with pytest.raises(ValueError, match=r"\(B, C, \*S\)"):
        global_pool.forward(np.zeros((2, 3)))


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_linear_gradcheck(xp, with_bias):
    rng = np.random.default_rng(4)
    inputs = {"h": arr(xp, rng.standard_normal((4, 5))), "w": arr(xp, rng.standard_normal((3, 5)))}
    if with_bias:
        inputs["b"] = arr(xp, rng.standard_normal(3))

    def fwd(inp):
        return linear.forward(inp["h"], inp["w"], inp.get("b"))

    def bwd(d, cache):
        g = linear.backward(d, cache)
        grads = {"h": g.dh, "w": g.dweight}
        if g.dbias is not None:
            grads["b"] = g.dbias
        return grads

    check(fwd, bwd, inputs)
    out, _ = fwd(inputs)
    expected = nlref.to_numpy(inputs["h"]) @ nlref.to_numpy(inputs["w"]).T
    if with_bias:
        expected = expected + nlref.to_numpy(inputs["b"])
    np.testing.assert_allclose(nlref.to_numpy(out), expected, rtol=1e-13, atol=1e-13)


def test_linear_bad_shapes():
    with pytest.raises(ValueError, match="same C_in"):
        linear.forward(np.zeros((2, 3)), np.zeros((4, 5)))


def test_cross_entropy_gradcheck_and_value(xp):
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((6, 3)) * 3
    labels = np.array([0, 2, 1, 1, 0, 2])
    lab = xp.asarray(labels)
    check(
        lambda inp: cross_entropy.forward(inp["s"], lab),
        lambda d, c: {"s": cross_entropy.backward(d, c)},
        {"s": arr(xp, logits)},
    )
    loss, _ = cross_entropy.forward(arr(xp, logits), lab)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -log_p[np.arange(6), labels].mean()
    assert abs(float(loss) - expected) < 1e-13


def test_cross_entropy_is_stable_for_huge_logits():
    loss, cache = cross_entropy.forward(np.array([[1000.0, 0.0], [0.0, 1000.0]]), np.array([0, 0]))
    assert np.isfinite(float(loss))
    assert abs(float(loss) - 500.0) < 1e-9  # one sample right, one 1000 nats wrong
    assert np.all(np.isfinite(cross_entropy.backward(1.0, cache)))


def test_cross_entropy_matches_torch(torch):
    rng = np.random.default_rng(6)
    logits = torch.tensor(rng.standard_normal((5, 4)), requires_grad=True)
    labels = np.array([3, 0, 1, 2, 3])
    ref = torch.nn.functional.cross_entropy(logits, torch.tensor(labels))
    ref.backward()
    loss, cache = cross_entropy.forward(logits.detach().numpy(), labels)
    np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-13)
    np.testing.assert_allclose(
        cross_entropy.backward(1.0, cache), logits.grad.numpy(), rtol=1e-12, atol=1e-14
    )


@pytest.mark.parametrize(
    ("labels", "error", "match"),
    [
        (np.array([0, 3]), ValueError, r"\[0, K\)"),
        (np.array([0, -1]), ValueError, r"\[0, K\)"),
        (np.array([0.0, 1.0]), TypeError, "integers"),
        (np.array([0, 1, 1]), ValueError, "labels of shape"),
    ],
)
def test_cross_entropy_bad_labels(labels, error, match):
    with pytest.raises(error, match=match):
        cross_entropy.forward(np.zeros((2, 3)), labels)


# ----------------------------------------------------------------------- optimisers


def test_adam_matches_torch(torch):
    rng = np.random.default_rng(7)
    w0 = rng.standard_normal((3, 2))
    grads_seq = [rng.standard_normal((3, 2)) for _ in range(4)]
    params, state = {"w": w0}, optim.adam_init({"w": w0})
    tw = torch.tensor(w0, requires_grad=True)
    opt = torch.optim.Adam([tw], lr=0.05, betas=(0.9, 0.999), eps=1e-8)
    for g in grads_seq:
        params, state = optim.adam_step(params, {"w": g}, state, lr=0.05)
        tw.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(params["w"], tw.detach().numpy(), rtol=1e-12, atol=1e-14)
    assert state.step == 4
    assert params["w"] is not w0 and np.array_equal(w0, w0.copy())  # pure: nothing mutated


def test_sgd_matches_torch(torch):
    rng = np.random.default_rng(8)
    w0 = rng.standard_normal(5)
    params, state = {"w": w0}, optim.sgd_init({"w": w0})
    tw = torch.tensor(w0, requires_grad=True)
    opt = torch.optim.SGD([tw], lr=0.1, momentum=0.9)
    for _ in range(3):
        g = rng.standard_normal(5)
        params, state = optim.sgd_step(params, {"w": g}, state, lr=0.1, momentum=0.9)
        tw.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(params["w"], tw.detach().numpy(), rtol=1e-13, atol=1e-15)


def test_optimisers_run_on_every_backend(xp):
    params = {"w": arr(xp, [1.0, -2.0])}
    grads = {"w": arr(xp, [0.5, 0.5])}
    new, _ = optim.adam_step(params, grads, optim.adam_init(params), lr=0.1)
    # the first Adam step moves every weight by lr, against the gradient's sign
    np.testing.assert_allclose(nlref.to_numpy(new["w"]), [0.9, -2.1], rtol=1e-7)
    new, _ = optim.sgd_step(params, grads, optim.sgd_init(params), lr=0.1)
    np.testing.assert_allclose(nlref.to_numpy(new["w"]), [0.95, -2.05], rtol=1e-12)


def test_optimiser_refuses_mismatched_grads():
    params = {"a": np.zeros(2), "b": np.zeros(2)}
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        optim.adam_step(params, {"a": np.zeros(2)}, optim.adam_init(params))


# ----------------------------------------------------------------------- the task


def test_sample_is_what_the_docstring_says():
    task = toy.ToyTask()
    batch = toy.sample(task, 200, rng=0)
    s, k = task.size, task.colours
    assert batch.x.shape == (200, 2 + k, s, s)
    assert 0.35 < batch.labels.mean() < 0.65  # balanced
    np.testing.assert_array_equal(batch.labels, batch.colours[:, 0] == batch.colours[:, 1])
    dist = np.abs(batch.markers[:, 0] - batch.markers[:, 1]).max(axis=1)
    assert dist.min() >= task.min_distance
    idx = np.arange(200)
    for m in (0, 1):
        r, c = batch.markers[:, m, 0], batch.markers[:, m, 1]
        assert np.all(batch.x[idx, m, r, c] > 0.5)  # the flag of marker m
        assert np.all(batch.x[idx, 2 + batch.colours[:, m], r, c] > 0.5)  # its colour
    flags = batch.x[:, :2] > 0.5
    assert flags.reshape(200, -1).sum(axis=1).tolist() == [2] * 200  # exactly two flags
    coloured = (batch.x[:, 2:] > 0.5).reshape(200, -1).sum(axis=1)
    assert np.all(coloured == 2 + task.distractors)


def test_sample_is_reproducible():
    a = toy.sample(toy.ToyTask(), 5, rng=42)
    b = toy.sample(toy.ToyTask(), 5, rng=42)
    np.testing.assert_array_equal(a.x, b.x)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"colours": 1}, "colours"),
        ({"min_distance": 12}, "min_distance"),
        ({"distractors": 200}, "distractors"),
        ({"noise": -1.0}, "noise"),
    ],
)
def test_task_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        toy.ToyTask(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "conv"}, "kind must be one of"),
        ({"kind": "local", "kernel": 2}, "kernel must be an odd int"),
        ({"kind": "nonlocal", "block_init": "zeros"}, "block_init"),
        (
            {"kind": "nonlocal", "block": nlref.NonLocalConfig(in_channels=8)},
            "must equal channels",
        ),
    ],
)
def test_model_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        toy.ToyModel(**kwargs)


# ----------------------------------------------------------------------- the models


def _small(kind):
    task = toy.ToyTask(size=6, colours=2, min_distance=3, distractors=1)
    model = toy.ToyModel(kind, in_channels=task.in_channels, channels=4, hidden=3)
    return task, model


@pytest.mark.parametrize("kind", toy.KINDS)
def test_model_backward_gradcheck(kind):
    """The whole model, images to loss: x and every trainable parameter."""
    task, model = _small(kind)
    params = toy.init_params(model, rng=1)
    rng = np.random.default_rng(9)
    for name in [n for n in params if n.endswith(".bias") and not n.startswith("nl.")]:
        # non-zero biases: with zero biases a position whose features are all 0 sits
        # exactly on the next ReLU's kink, where finite differences are meaningless
        params[name] = rng.uniform(0.1, 0.3, params[name].shape)
    if kind == "nonlocal":  # open the block: random weights and gamma != 0
        block = nlref.init_params(model.block, rng=2, scheme="random")
        params.update({f"nl.{n}": v for n, v in block.items()})
    data = toy.sample(task, 3, rng=3)
    names = list(toy.trainable(params))
    buffers = {n: v for n, v in params.items() if n not in names}

    def fwd(inp):
        logits, cache = toy.forward({**buffers, **{n: inp[n] for n in names}}, inp["x"], model)
        loss, ce = cross_entropy.forward(logits, data.labels)
        return loss, (cache, ce)

    def bwd(dloss, caches):
        cache, ce = caches
        dx, grads = toy.backward(cross_entropy.backward(dloss, ce), cache)
        return {"x": dx, **grads}

    inputs = {"x": data.x, **{n: params[n] for n in names}}
    result = nlref.gradcheck(fwd, bwd, inputs, wrt=["x", *names], n_directions=2)
    assert result.ok, str(result)
    assert set(result.args) == {"x", *names}


def _marker_variants(task, n=6, rng=5):
    return [
        toy.sample(task, n, rng=rng, markers=m).x
        for m in ((True, True), (True, False), (False, True), (False, False))
    ]


def test_local_model_is_additive_in_the_two_markers():
    """The proof behind the baseline, checked: no window sees both markers, so
    l(A and B) - l(A) - l(B) + l(neither) = 0 exactly, for any weights."""
    task = toy.ToyTask()
    model = toy.ToyModel("local")
    both, a, b, neither = _marker_variants(task)
    for seed in range(3):
        params = toy.init_params(model, rng=seed)
        logit = {
            k: toy.forward(params, v, model)[0]
            for k, v in zip("XABN", (both, a, b, neither), strict=True)
        }
        gap = logit["X"] - logit["A"] - logit["B"] + logit["N"]
        assert np.abs(gap).max() < 1e-12
        assert np.abs(logit["X"] - logit["N"]).max() > 1e-3  # the markers do matter


def test_nonlocal_model_is_not_additive():
    task = toy.ToyTask()
    model = toy.ToyModel("nonlocal")
    params = toy.init_params(model, rng=0)
    block = nlref.init_params(model.block, rng=1, scheme="random")  # an open, random block
    params.update({f"nl.{n}": v for n, v in block.items()})
    both, a, b, neither = _marker_variants(task)
    logit = {
        k: toy.forward(params, v, model, training=False)[0]
        for k, v in zip("XABN", (both, a, b, neither), strict=True)
    }
    gap = logit["X"] - logit["A"] - logit["B"] + logit["N"]
    assert np.abs(gap).max() > 1e-3 * np.abs(logit["X"] - logit["N"]).max()


def test_train_refuses_a_baseline_that_sees_both_markers():
    with pytest.raises(ValueError, match="min_distance >= 5"):
        toy.train(toy.ToyTask(min_distance=4), toy.ToyModel("local", stem_kernel=3), steps=1)


def test_train_refuses_mismatched_channels():
    with pytest.raises(ValueError, match="channels"):
        toy.train(toy.ToyTask(colours=3), toy.ToyModel("local"), steps=1)


@pytest.mark.parametrize("kind", toy.KINDS)
def test_short_training_run(kind):
    task, model = _small(kind)
    r = toy.train(task, model, steps=6, batch=8, test_size=20, seed=1)
    assert len(r.losses) == len(r.train_acc) == 6
    assert all(np.isfinite(r.losses))
    assert 0.0 <= r.test_acc <= 1.0
    assert r.seconds > 0
    fresh = toy.init_params(model, np.random.default_rng(1))
    moved = [n for n in fresh if not np.array_equal(fresh[n], r.params[n])]
    assert "head.weight" in moved and "stem.weight" in moved
    if kind == "nonlocal":  # BN's running statistics were updated from the batches
        assert "nl.bn.running_mean" in moved


def test_training_shows_progress_on_request(capsys):
    """A bar over the steps on stderr (``nlref demo --toy``), nothing by default."""
    task, model = _small("nonlocal")
    toy.train(task, model, steps=3, batch=4, test_size=8, show_progress=True)
    captured = capsys.readouterr()
    assert "nonlocal training" in captured.err and "0/3" in captured.err
    assert captured.out == ""
    toy.train(task, model, steps=3, batch=4, test_size=8)
    assert capsys.readouterr().err == ""


def test_training_runs_on_array_api_strict():
    xps = require("array_api_strict")
    task, model = _small("nonlocal")
    r = toy.train(task, model, steps=2, batch=4, test_size=8, xp=xps)
    assert type(r.params["stem.weight"]).__module__.startswith("array_api_strict")


def test_marker_attention():
    task, model = _small("nonlocal")
    params = toy.init_params(model, rng=0)
    batch = toy.sample(task, 4, rng=0)
    maps, on_other = toy.marker_attention(params, batch, model)
    assert maps.shape == (4, task.size, task.size)
    np.testing.assert_allclose(maps.reshape(4, -1).sum(axis=1), 1.0, rtol=1e-12)
    for i in range(4):
        (rb, cb) = batch.markers[i, 1]
        assert on_other[i] == maps[i, rb, cb]
    with pytest.raises(ValueError, match="non-local"):
        toy.marker_attention(toy.init_params(toy.ToyModel("local")), batch, toy.ToyModel("local"))
