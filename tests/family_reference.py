"""Independent PyTorch autograd references of GCNet and the disentangled non-local block.

Written from the papers' formulas with stock torch ops (``conv{d}d``, ``max_pool{d}d``,
``F.linear``, ``F.layer_norm``, ``softmax``, ``sigmoid``, ``einsum``, ``F.batch_norm``),
never from nlref's functions; autograd supplies the backward. Parameters are keyed like
:func:`nlref.family.param_shapes`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "assert_backend_equals_numpy",
    "assert_float32_path",
    "autograd",
    "gradcheck_block",
    "run_on",
    "torch_dnl",
    "torch_gcnet",
]


def torch_gcnet(x: Any, p: Mapping[str, Any], cfg: Any) -> Any:
    """z of GCNet for x (B, C, *S): context, one transform per fusion, gate then add."""
    import torch
    import torch.nn.functional as F

    flat = x.flatten(2)  # (B, C, N)
    if cfg.pooling == "att":
        logits = torch.einsum("oc,bcn->bn", p["mask.weight"], flat) + p["mask.bias"]
        context = torch.einsum("bn,bcn->bc", torch.softmax(logits, dim=-1), flat)
    else:
        context = flat.mean(dim=-1)  # (B, C)

    def transform(f: str) -> Any:  # W2 ReLU(LN(W1 c + b1)) + b2, on (B, C) vectors
        h = F.linear(context, p[f"{f}.fc1.weight"], p[f"{f}.fc1.bias"])
        h = F.layer_norm(h, h.shape[-1:], p[f"{f}.norm.weight"], p[f"{f}.norm.bias"], cfg.ln_eps)
        return F.linear(torch.relu(h), p[f"{f}.fc2.weight"], p[f"{f}.fc2.bias"])

    spread = (slice(None), slice(None), *([None] * (x.dim() - 2)))  # (B, C) -> (B, C, 1, ...)
    z = x
    if "channel_mul" in cfg.fusion:
        z = z * torch.sigmoid(transform("channel_mul"))[spread]
    if "channel_add" in cfg.fusion:
        z = z + transform("channel_add")[spread]
    return z


def torch_dnl(x: Any, p: Mapping[str, Any], cfg: Any, training: bool) -> tuple[Any, dict]:
    """z of the disentangled non-local block for x (B, C, *S), and BN's new running stats."""
    import torch
    import torch.nn.functional as F

    d = x.dim() - 2
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[d]
    kernel = cfg.sub_sample

    def pool(u: Any) -> Any:
        if kernel is None:
            return u
        return {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[d](u, kernel, kernel)

    def conv1x1(name: str, u: Any) -> Any:
        w = p[f"{name}.weight"]
        return conv(u, w.reshape(*w.shape, *([1] * d)), p.get(f"{name}.bias"))

    def keys(name: str) -> Any:  # φ, g and the unary logits: pooled like the paper or Caffe2
        if cfg.pool_order == "before_projection":
            return conv1x1(name, pool(x)).flatten(2)
        return pool(conv1x1(name, x)).flatten(2)

    theta, phi, g = conv1x1("theta", x).flatten(2), keys("phi"), keys("g")
    theta = theta - theta.mean(dim=-1, keepdim=True)  # whitened, over positions
    phi = phi - phi.mean(dim=-1, keepdim=True)
    alpha = 1.0 if cfg.scale is None else cfg.scale
    logits = torch.einsum("bci,bcj->bij", theta, phi) * alpha / cfg.temperature
    y = torch.einsum("bij,bcj->bci", torch.softmax(logits, dim=-1), g)  # pairwise
    unary = torch.softmax(keys("mask")[:, 0], dim=-1)  # (B, N')
    y = y + torch.einsum("bj,bcj->bc", unary, g)[..., None]  # unary, the same for all i
    h = conv1x1("z", y.reshape(y.shape[0], y.shape[1], *x.shape[2:]))
    updated: dict[str, Any] = {}
    if cfg.norm == "batchnorm":
        mean, var = p["bn.running_mean"].clone(), p["bn.running_var"].clone()
        h = F.batch_norm(
            h, mean, var, p["bn.weight"], p["bn.bias"], training, cfg.bn_momentum, cfg.bn_eps
        )
        if training:
            updated = {"bn.running_mean": mean, "bn.running_var": var}
    return h + x, updated


def autograd(
    fn: Callable[[Any, dict[str, Any]], Any],
    x: np.ndarray,
    params: Mapping[str, np.ndarray],
    dz: np.ndarray,
    buffers: tuple[str, ...] = (),
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """z = fn(x, params) in float64 torch, and the gradients of ⟨dz, z⟩ for x and every
    parameter not in ``buffers``, as NumPy arrays keyed "x" and by parameter name."""
    import torch

    def tensor(a: np.ndarray, grad: bool) -> Any:
        return torch.tensor(np.array(a, dtype=np.float64), requires_grad=grad)

    xt = tensor(x, True)
    pt = {n: tensor(v, n not in buffers) for n, v in params.items()}
    z = fn(xt, pt)
    z.backward(torch.tensor(dz))
    grads = {
        "x": xt.grad.numpy(),
        **{n: t.grad.numpy() for n, t in pt.items() if t.grad is not None},
    }
    return z.detach().numpy(), grads


def run_on(
    backend: str,
    block: Any,
    x: np.ndarray,
    params: Mapping[str, np.ndarray],
    cfg: Any,
    dz: np.ndarray,
    training: bool = True,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """``block.forward`` then ``block.backward`` on PyTorch tensors or JAX arrays (float64,
    CPU); z, dx and the gradients come back as NumPy arrays. JAX runs the two as one
    ``jax.jit``-compiled function (compiling each operation eagerly takes seconds), which
    also shows that the reference is purely functional."""
    import contextlib

    import nlref

    def run(x: Any, params: dict[str, Any], dz: Any) -> tuple[Any, Any, dict[str, Any]]:
        z, cache = block.forward(x, params, cfg, training)
        dx, grads = block.backward(dz, cache)
        return z, dx, grads

    if backend == "torch":
        import torch

        move, scope = torch.asarray, contextlib.nullcontext()
    else:
        import jax
        import jax.numpy as jnp

        move, scope, run = jnp.asarray, jax.enable_x64(True), jax.jit(run)
    with scope:
        z, dx, grads = run(move(x), {n: move(v) for n, v in params.items()}, move(dz))
        assert type(z) is type(move(x)) and str(z.dtype).endswith("float64")
        host = {n: nlref.to_numpy(g) for n, g in grads.items()}
        return nlref.to_numpy(z), nlref.to_numpy(dx), host


def assert_backend_equals_numpy(
    backend: str, block: Any, x: np.ndarray, params: Mapping[str, np.ndarray], cfg: Any
) -> None:
    """z, x̄ and every gradient on ``backend`` equal NumPy's to 1e-12."""
    z, cache = block.forward(x, dict(params), cfg)
    dz = np.random.default_rng(5).standard_normal(z.shape)
    dx, grads = block.backward(dz, cache)
    z_b, dx_b, grads_b = run_on(backend, block, x, params, cfg, dz)
    assert set(grads_b) == set(grads)  # (jax.jit returns dicts in sorted key order)
    for name, (ours, theirs) in {"z": (z, z_b), "x": (dx, dx_b)}.items():
        np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-12, err_msg=name)
    for name, g in grads.items():
        np.testing.assert_allclose(grads_b[name], g, rtol=0, atol=1e-12, err_msg=name)


def gradcheck_block(
    block: Any, x: np.ndarray, params: Mapping[str, np.ndarray], cfg: Any, xp: Any
) -> None:
    """``nlref.gradcheck`` of ``block`` on ``xp``, for x and every trainable parameter."""
    import nlref
    from nlref import family

    trainable = family.trainable_names(cfg)
    buffers = {n: xp.asarray(v) for n, v in params.items() if n not in trainable}
    inputs = {"x": xp.asarray(x), **{n: xp.asarray(params[n]) for n in trainable}}

    def forward(a: dict[str, Any]) -> Any:
        return block.forward(a["x"], {**buffers, **{n: a[n] for n in trainable}}, cfg)

    def backward(dz: Any, cache: Any) -> dict[str, Any]:
        dx, grads = block.backward(dz, cache)
        return {"x": dx, **grads}

    result = nlref.gradcheck(forward, backward, inputs)
    assert result.ok and set(result.args) == {"x", *trainable}, str(result)


def assert_float32_path(
    block: Any, x: np.ndarray, params: Mapping[str, np.ndarray], cfg: Any
) -> Any:
    """float32 in gives float32 z, x̄ and gradients, and z close to the float64 one; returns
    the float32 cache."""
    z64, _ = block.forward(x, dict(params), cfg)
    p32 = {n: v.astype(np.float32) for n, v in params.items()}
    z, cache = block.forward(x.astype(np.float32), p32, cfg)
    dx, grads = block.backward(np.ones_like(z), cache)
    assert {a.dtype for a in (z, dx, *grads.values())} == {np.dtype(np.float32)}
    np.testing.assert_allclose(z, z64, atol=1e-4)
    return cache
