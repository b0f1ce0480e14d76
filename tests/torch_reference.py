"""An independent PyTorch autograd implementation of the Non-local block, for comparisons.

Written from the math, not from nlref: every step uses stock torch ops (1×1 ``conv{d}d``,
``max_pool{d}d`` with kernel = stride, ``bmm``, ``softmax``, ``batch_norm``), and autograd
supplies the backward. The concatenation variant is built the materialising way, as
AlexHex7 and mmcv do (the B×2C′×N×N′ tensor [θᵢ; φⱼ] projected by a 1×1 conv), so that it
shares nothing with nlref's O(N·N′) split into w_θᵀθᵢ + w_φᵀφⱼ.

Conventions (those of nlref): x (B, C, *S), N = prod(S); params keyed like
:func:`nlref.param_shapes` (``theta.weight`` of shape (C′, C), ``concat.weight`` (2C′,),
``bn.running_mean``, ...); a missing ``<layer>.bias`` key means that layer has no bias.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["BUFFER_NAMES", "torch_block", "torch_embeddings"]

BUFFER_NAMES = ("bn.running_mean", "bn.running_var")


def _torch() -> Any:
    import torch

    return torch


def _tensor(a: Any, requires_grad: bool = False) -> Any:
    torch = _torch()
    t = torch.tensor(np.array(a, dtype=np.float64, copy=True), dtype=torch.float64)
    return t.requires_grad_(requires_grad)


def _conv1x1(u: Any, weight: Any, bias: Any | None) -> Any:
    """1×1 convolution of u (B, C_in, *S) with weight (C_out, C_in), as nn.Conv{d}d does."""
    import torch.nn.functional as F

    d = u.dim() - 2
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[d]
    return conv(u, weight.reshape(*weight.shape, *([1] * d)), bias)


def _maxpool(u: Any, kernel: tuple[int, ...] | None) -> Any:
    """Max-pool u (B, C, *S) with kernel = stride (floors odd sizes); identity when None."""
    import torch.nn.functional as F

    if kernel is None:
        return u
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[u.dim() - 2]
    return pool(u, kernel_size=tuple(kernel), stride=tuple(kernel))


def torch_embeddings(
    xt: Any, tensors: Mapping[str, Any], cfg: Any
) -> tuple[Any, Any, Any, tuple[int, ...]]:
    """θ (B, C′ or C, N), φ (B, ·, N′), g (B, C′, N′) and the pooled spatial shape.

    ``xt`` is a torch tensor (B, C, *S); ``tensors`` maps param names to torch tensors.
    The Gaussian compares x itself: θ = x, φ = pool(x).
    """
    kernel = cfg.sub_sample
    before = kernel is not None and cfg.pool_order == "before_projection"

    def conv(layer: str, u: Any) -> Any:
        return _conv1x1(u, tensors[f"{layer}.weight"], tensors.get(f"{layer}.bias"))

    def key(layer: str) -> Any:
        if before:
            return conv(layer, _maxpool(xt, kernel))  # Caffe2 / pytorchvideo
        return _maxpool(conv(layer, xt), kernel)  # paper / AlexHex7 / mmcv

    if "theta.weight" in tensors:
        theta = conv("theta", xt)
        phi = key("phi")
    else:  # Gaussian
        theta = xt
        phi = _maxpool(xt, kernel)
    g = key("g")
    key_shape = tuple(g.shape[2:])
    return theta.flatten(2), phi.flatten(2), g.flatten(2), key_shape


def torch_block(
    x: np.ndarray,
    params: Mapping[str, Any],
    cfg: Any,
    *,
    training: bool,
    dz: np.ndarray,
) -> dict[str, Any]:
    """Forward and autograd backward of the block in float64 torch.

    Parameters
    ----------
    x : array (B, C, *S), converted to float64
    params : mapping name -> array (NumPy or anything ``np.asarray`` accepts)
    cfg : nlref.NonLocalConfig (only its fields are read)
    training : bool
        Batch-norm mode.
    dz : array like x
        Upstream gradient.

    Returns
    -------
    dict with NumPy float64 arrays:
        ``z``, ``attention`` (B, N, N′), ``dx``, ``grads`` (name -> gradient for every
        parameter except the BN buffers), and ``buffers`` (the running statistics after
        the forward: updated in training mode, unchanged in eval mode; empty without BN).
    """
    torch = _torch()
    import torch.nn.functional as F

    xt = _tensor(x, requires_grad=True)
    tensors = {n: _tensor(v, requires_grad=n not in BUFFER_NAMES) for n, v in params.items()}
    b, _, *spatial = xt.shape

    theta, phi, g, key_shape = torch_embeddings(xt, tensors, cfg)
    n_keys = math.prod(key_shape)
    ci = g.shape[1]

    if cfg.pairwise == "concatenation":
        # materialise [theta_i; phi_j] as (B, 2C', N, N') and project it with a 1x1 conv
        n = theta.shape[2]
        pairs = torch.cat(
            [
                theta[:, :, :, None].expand(b, ci, n, n_keys),
                phi[:, :, None, :].expand(b, ci, n, n_keys),
            ],
            dim=1,
        )
        w = tensors["concat.weight"].reshape(1, 2 * ci, 1, 1)
        f = F.relu(F.conv2d(pairs, w)).squeeze(1)  # (B, N, N')
        attention = f / n_keys
    else:
        logits = cfg.effective_scale * torch.bmm(theta.transpose(1, 2), phi)  # (B, N, N')
        if cfg.pairwise in ("gaussian", "embedded_gaussian"):
            attention = torch.softmax(logits, dim=-1)
        elif cfg.pairwise == "dot_product":
            attention = logits / n_keys
        else:
            raise ValueError(f"the torch reference has no pairwise {cfg.pairwise!r}")

    y = torch.bmm(attention, g.transpose(1, 2)).transpose(1, 2)  # (B, C', N)
    y = y.reshape(b, ci, *spatial)
    wy = _conv1x1(y, tensors["z.weight"], tensors.get("z.bias"))

    buffers: dict[str, Any] = {}
    if cfg.norm == "batchnorm":
        running_mean = tensors["bn.running_mean"].clone()
        running_var = tensors["bn.running_var"].clone()
        wy = F.batch_norm(
            wy,
            running_mean,
            running_var,
            tensors["bn.weight"],
            tensors["bn.bias"],
            training=training,
            momentum=cfg.bn_momentum,
            eps=cfg.bn_eps,
        )  # updates running_mean / running_var in place in training mode
        buffers = {"bn.running_mean": running_mean, "bn.running_var": running_var}
    elif cfg.norm is not None:
        raise ValueError(f"the torch reference has no norm {cfg.norm!r}")
    z = wy + xt

    z.backward(_tensor(dz))

    def host(t: Any) -> np.ndarray:
        return t.detach().cpu().numpy().copy()

    grads = {}
    for name, t in tensors.items():
        if name in BUFFER_NAMES:
            continue
        grads[name] = host(t.grad) if t.grad is not None else np.zeros(tuple(t.shape))
    return {
        "z": host(z),
        "attention": host(attention),
        "dx": host(xt.grad),
        "grads": grads,
        "buffers": {n: host(t) for n, t in buffers.items()},
    }
