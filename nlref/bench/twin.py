"""The Non-local block in PyTorch eager, with autograd: nlref's independent twin.

Written from the paper's math and from the public implementations (AlexHex7, mmcv,
pytorchvideo), never from nlref: every step is a stock torch op (1×1 ``conv{d}d``,
``max_pool{d}d`` with kernel = stride, ``matmul``, ``softmax``, ``batch_norm``) and autograd
supplies the backward. It serves two purposes:

- ``nlref bench`` times it, in float32, as the PyTorch eager peer of nlref;
- the tests compare nlref with it, in float64 (:func:`reference`), as an independent
  autograd reference.

Conventions (nlref's): x (B, C, *S), N = prod(S); parameters keyed like
:func:`nlref.param_shapes` (``theta.weight`` of shape (C′, C), ``concat.weight`` (2C′,),
``bn.running_mean``, ...). A missing ``<layer>.bias`` means that layer has no bias, and a
missing ``theta.weight`` means θ = x and φ = P(x) (the Gaussian). The configuration is read
only for its fields (``pairwise``, ``scale``, ``sub_sample``, ``pool_order``, ``norm``,
``bn_eps``, ``bn_momentum``).

The pairwise function comes from :data:`FORMULAS`, the twin's own torch formula per known
variant. A registered variant that has no formula there is refused with
:class:`UnknownVariantError`: the twin cannot be independent of a formula it does not know.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "BUFFER_NAMES",
    "FORMULAS",
    "Twin",
    "UnknownVariantError",
    "block",
    "embeddings",
    "reference",
]

BUFFER_NAMES = ("bn.running_mean", "bn.running_var")


class UnknownVariantError(NotImplementedError):
    """The twin has no torch formula for this pairwise function."""


@dataclass(frozen=True)
class Twin:
    """What :func:`block` computes (torch tensors, in the autograd graph).

    Attributes
    ----------
    z : tensor (B, C, *S)
        The block's output.
    attention : tensor (B, N, N′)
        A = f / C(x).
    buffers : dict
        The batch-norm running statistics after the forward: updated in training mode,
        unchanged in eval mode; empty without a norm.
    """

    z: Any
    attention: Any
    buffers: dict[str, Any]


def _conv1x1(u: Any, weight: Any, bias: Any | None) -> Any:
    """1×1 convolution of u (B, C_in, *S) with weight (C_out, C_in), as nn.Conv{d}d does."""
    import torch.nn.functional as F

    d = u.dim() - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
    return conv(u, weight.reshape(*weight.shape, *([1] * d)), bias)


def _maxpool(u: Any, kernel: tuple[int, ...] | None) -> Any:
    """Max-pool u (B, C, *S) with kernel = stride (floors odd sizes); identity when None."""
    import torch.nn.functional as F

    if kernel is None:
        return u
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[u.dim() - 3]
    return pool(u, kernel_size=tuple(kernel), stride=tuple(kernel))


def embeddings(
    x: Any, tensors: Mapping[str, Any], cfg: Any
) -> tuple[Any, Any, Any, tuple[int, ...]]:
    """θ (B, C′ or C, N), φ (B, ·, N′), g (B, C′, N′) and the keys' spatial shape.

    ``x`` is a torch tensor (B, C, *S); ``tensors`` maps parameter names to torch tensors.
    Pooling follows ``cfg.pool_order``: after the projection (the paper, AlexHex7, mmcv) or
    before it (Caffe2, pytorchvideo).
    """
    kernel = cfg.sub_sample
    before = kernel is not None and cfg.pool_order == "before_projection"

    def conv(layer: str, u: Any) -> Any:
        return _conv1x1(u, tensors[f"{layer}.weight"], tensors.get(f"{layer}.bias"))

    def key(layer: str) -> Any:
        if before:
            return conv(layer, _maxpool(x, kernel))
        return _maxpool(conv(layer, x), kernel)

    if "theta.weight" in tensors:
        theta, phi = conv("theta", x), key("phi")
    else:  # the Gaussian compares x itself
        theta, phi = x, _maxpool(x, kernel)
    g = key("g")
    return theta.flatten(2), phi.flatten(2), g.flatten(2), tuple(g.shape[2:])


# ------------------------------------------------------------------ pairwise formulas
# Each maps θ (B, C_f, N), φ (B, C_f, N′) to the attention A = f / C(x) (B, N, N′).


def _softmax_of_products(
    theta: Any, phi: Any, tensors: Mapping[str, Any], cfg: Any, materialise: bool
) -> Any:
    """Gaussian and embedded Gaussian: A = softmax_j(α θᵢᵀφⱼ), as AlexHex7 and mmcv write it:
    ``f = matmul(theta_x, phi_x)`` with theta_x the (B, N, C′) view, scaled only when α ≠ 1."""
    import torch

    f = torch.matmul(theta.transpose(1, 2), phi)  # (B, N, C') @ (B, C', N')
    if cfg.scale is not None:
        f = f * cfg.scale
    return torch.softmax(f, dim=-1)


def _dot_product(
    theta: Any, phi: Any, tensors: Mapping[str, Any], cfg: Any, materialise: bool
) -> Any:
    """Dot product: A = α θᵢᵀφⱼ / N′ (``f / N`` in AlexHex7 and mmcv)."""
    import torch

    f = torch.matmul(theta.transpose(1, 2), phi)  # (B, N, C') @ (B, C', N')
    if cfg.scale is not None:
        f = f * cfg.scale
    return f / phi.shape[-1]


def _concatenation(
    theta: Any, phi: Any, tensors: Mapping[str, Any], cfg: Any, materialise: bool
) -> Any:
    """Concatenation: A = ReLU(w_fᵀ[θᵢ; φⱼ]) / N′.

    ``materialise``: as AlexHex7 and mmcv, build [θᵢ; φⱼ] as a (B, 2C′, N, N′) tensor and
    project it with a 1×1 convolution. Otherwise the memory-frugal split
    w_fᵀ[θᵢ; φⱼ] = w_θᵀθᵢ + w_φᵀφⱼ, which never holds more than (B, N, N′).
    """
    import torch
    import torch.nn.functional as F

    b, ci, n = theta.shape
    n_keys = phi.shape[-1]
    w = tensors["concat.weight"]
    if materialise:
        pairs = torch.cat(
            [
                theta[:, :, :, None].expand(b, ci, n, n_keys),
                phi[:, :, None, :].expand(b, ci, n, n_keys),
            ],
            dim=1,
        )
        f = F.relu(F.conv2d(pairs, w.reshape(1, 2 * ci, 1, 1))).squeeze(1)
    else:
        queries = torch.matmul(w[:ci], theta)  # (B, N)
        keys = torch.matmul(w[ci:], phi)  # (B, N')
        f = F.relu(queries[:, :, None] + keys[:, None, :])
    return f / n_keys


#: The twin's torch formula of each pairwise function it knows, by variant name.
FORMULAS: dict[str, Callable[[Any, Any, Mapping[str, Any], Any, bool], Any]] = {
    "gaussian": _softmax_of_products,
    "embedded_gaussian": _softmax_of_products,
    "dot_product": _dot_product,
    "concatenation": _concatenation,
}


def formula(name: str) -> Callable[[Any, Any, Mapping[str, Any], Any, bool], Any]:
    """The twin's formula for the pairwise function ``name``.

    Raises
    ------
    UnknownVariantError
        If the twin has no formula of that name (for example a variant registered by a
        user): the message says where to add one.
    """
    try:
        return FORMULAS[name]
    except KeyError:
        raise UnknownVariantError(
            f"the PyTorch twin (nlref.bench.twin) has no formula for the pairwise function "
            f"{name!r}; it knows {sorted(FORMULAS)}. Add an independent torch formula to "
            "nlref.bench.twin.FORMULAS to benchmark or test it against PyTorch"
        ) from None


def block(
    x: Any,
    tensors: Mapping[str, Any],
    cfg: Any,
    *,
    training: bool = True,
    materialise: bool = True,
) -> Twin:
    """The forward of the block on torch tensors, in the autograd graph.

    Parameters
    ----------
    x : torch tensor (B, C, *S)
        Float32 or float64, on any device; set ``requires_grad`` for its gradient.
    tensors : mapping name -> torch tensor
        Parameters and batch-norm buffers, in x's dtype and device. The buffers are cloned,
        never updated in place.
    cfg : nlref.NonLocalConfig
        Read for its fields only.
    training : bool
        Batch-norm mode.
    materialise : bool
        For the concatenation: the (B, 2C′, N, N′) pairs tensor of AlexHex7 and mmcv
        (True), or the memory-frugal split (False). The other variants ignore it.

    Returns
    -------
    Twin
    """
    import torch
    import torch.nn.functional as F

    attend = formula(cfg.pairwise)
    b, _, *spatial = x.shape
    theta, phi, g, _ = embeddings(x, tensors, cfg)
    attention = attend(theta, phi, tensors, cfg, materialise)
    # y = g Aᵀ, as AlexHex7 and mmcv write it: matmul(A, g_x) with g_x the (B, N', C') view,
    # then back to (B, C', *S)
    y = torch.matmul(attention, g.transpose(1, 2))  # (B, N, C')
    y = y.permute(0, 2, 1).contiguous().reshape(b, g.shape[1], *spatial)
    wy = _conv1x1(y, tensors["z.weight"], tensors.get("z.bias"))
    buffers: dict[str, Any] = {}
    if cfg.norm == "batchnorm":
        buffers = {name: tensors[name].clone() for name in BUFFER_NAMES}
        wy = F.batch_norm(
            wy,
            buffers["bn.running_mean"],
            buffers["bn.running_var"],
            tensors["bn.weight"],
            tensors["bn.bias"],
            training=training,
            momentum=cfg.bn_momentum,
            eps=cfg.bn_eps,
        )  # updates the cloned buffers in training mode
    elif cfg.norm is not None:
        raise ValueError(f"the PyTorch twin has no norm {cfg.norm!r}")
    return Twin(z=wy + x, attention=attention, buffers=buffers)


def reference(
    x: Any,
    params: Mapping[str, Any],
    cfg: Any,
    *,
    training: bool,
    dz: Any,
    dtype: str = "float64",
    materialise: bool = True,
) -> dict[str, Any]:
    """Forward and autograd backward of the block, from and to NumPy arrays.

    Parameters
    ----------
    x : array (B, C, *S)
    params : mapping name -> array (anything ``np.asarray`` accepts)
    cfg : nlref.NonLocalConfig
    training : bool
        Batch-norm mode.
    dz : array like x
        Upstream gradient.
    dtype : {"float64", "float32"}
        The dtype the twin computes in (inputs are converted).
    materialise : bool
        See :func:`block`.

    Returns
    -------
    dict
        NumPy arrays in ``dtype``: ``z``, ``attention`` (B, N, N′), ``dx``, ``grads`` (name
        -> gradient of every parameter except the BN buffers) and ``buffers`` (the running
        statistics after the forward; empty without a norm).
    """
    import torch

    torch_dtype = {"float64": torch.float64, "float32": torch.float32}[dtype]

    def tensor(a: Any, requires_grad: bool = False) -> Any:
        t = torch.tensor(np.array(a, dtype=dtype, copy=True), dtype=torch_dtype)
        return t.requires_grad_(requires_grad)

    xt = tensor(x, requires_grad=True)
    tensors = {n: tensor(v, requires_grad=n not in BUFFER_NAMES) for n, v in params.items()}
    out = block(xt, tensors, cfg, training=training, materialise=materialise)
    out.z.backward(tensor(dz))

    def host(t: Any) -> np.ndarray:
        return t.detach().cpu().numpy().copy()

    grads = {
        name: host(t.grad) if t.grad is not None else np.zeros(tuple(t.shape), dtype=dtype)
        for name, t in tensors.items()
        if name not in BUFFER_NAMES
    }
    return {
        "z": host(out.z),
        "attention": host(out.attention),
        "dx": host(xt.grad),
        "grads": grads,
        "buffers": {n: host(t) for n, t in out.buffers.items()},
    }
