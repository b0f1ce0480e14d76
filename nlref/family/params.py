"""Parameters of the family's blocks: names, shapes, initialisation, and the boundary checks.

GCNet (``pooling="att"``; one transform per fusion ``f`` in ``cfg.fusion``):

==========================================  ========  ====================================
name                                        shape     note
==========================================  ========  ====================================
``mask.weight``, ``mask.bias``              (1, C),   w_k, b_k of the context logits
                                            (1,)      (``pooling="att"`` only)
``<f>.fc1.weight``, ``<f>.fc1.bias``        (C′, C),  W₁, b₁
                                            (C′,)
``<f>.norm.weight``, ``<f>.norm.bias``      (C′,)     the layer norm's γ, β
``<f>.fc2.weight``, ``<f>.fc2.bias``        (C, C′),  W₂, b₂
                                            (C,)
==========================================  ========  ====================================

DNL: the parameters of its :attr:`~nlref.family.DNLConfig.nonlocal_config` (see
:mod:`nlref.params`), with ``mask.weight`` (1, C) and ``mask.bias`` (1,), the unary
term's w_m and b_m, after those of g.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

import numpy as np

from .._backend import Array
from ..checks import check_training, check_x
from ..params import BUFFERS, check_against, draw_param, new_params
from ..params import param_shapes as block_param_shapes
from .config import DNLConfig, GCNetConfig

__all__ = [
    "check_forward",
    "check_params",
    "in_param_order",
    "init_params",
    "param_shapes",
    "trainable_names",
]

FamilyConfig = GCNetConfig | DNLConfig


def param_shapes(cfg: FamilyConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter (and buffer) of the block configured by ``cfg``, with its shape, in
    the order of the gradients that the block's ``backward`` returns."""
    _check_config(cfg)
    c, ci = cfg.in_channels, cfg.inter_channels
    mask = _mask_shapes(cfg)
    if isinstance(cfg, DNLConfig):  # θ, φ, g, then the mask, then z and bn
        block = block_param_shapes(cfg.nonlocal_config)
        before = {n: s for n, s in block.items() if n.split(".")[0] in ("theta", "phi", "g")}
        return {**before, **mask, **block}
    shapes = dict(mask) if cfg.pooling == "att" else {}
    for f in cfg.fusion:
        shapes |= {f"{f}.fc1.weight": (ci, c), f"{f}.fc1.bias": (ci,)}
        shapes |= {f"{f}.norm.weight": (ci,), f"{f}.norm.bias": (ci,)}
        shapes |= {f"{f}.fc2.weight": (c, ci), f"{f}.fc2.bias": (c,)}
    return shapes


def in_param_order(grads: Mapping[str, Array], cfg: FamilyConfig) -> dict[str, Array]:
    """``grads`` in the order of :func:`param_shapes`."""
    return {name: grads[name] for name in param_shapes(cfg) if name in grads}


def init_params(
    cfg: FamilyConfig,
    rng: int | np.random.Generator | None = 0,
    *,
    dtype: str = "float64",
    xp: Any = None,
    device: Any = None,
    scheme: str = "paper",
    weight_std: float = 0.01,
) -> dict[str, Array]:
    """Create the parameters of a GCNet or DNL block.

    Parameters
    ----------
    cfg : GCNetConfig or DNLConfig
    rng, dtype, xp, device, weight_std
        As in :func:`nlref.init_params` (random numbers come from NumPy, then move to
        ``xp``). ``weight_std`` is used by DNL only.
    scheme : {"paper", "random"}
        ``"paper"``: GCNet as its authors' code (mmcv's ``ContextBlock``): w_k Kaiming-normal
        N(0, 2/C) with b_k = 0, W₁ and b₁ PyTorch's default U(±1/√C), γ = 1, β = 0, and
        **W₂ = 0, b₂ = 0**, so a fresh ``channel_add`` block is the identity and a fresh
        ``channel_mul`` block halves x (σ(0) = 1/2). DNL: the Non-local block's paper
        initialisation (a fresh block is the identity), and w_m ~ N(0, weight_std²),
        b_m = 0. ``"random"``: every parameter drawn non-degenerately (weights
        N(0, 1/fan_in), biases N(0, 0.2²), γ ∈ [0.5, 1.5]), for gradient checks.

    Returns
    -------
    dict
        Name -> array, with the keys of :func:`param_shapes`.
    """
    _check_config(cfg)
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    settings = {"scheme": scheme, "dtype": dtype, "xp": xp, "device": device}
    if isinstance(cfg, DNLConfig):  # the Non-local block's parameters, then w_m and b_m
        block = cfg.nonlocal_config
        shapes = {**block_param_shapes(block), **_mask_shapes(cfg)}

        def draw(name: str, shape: tuple[int, ...]) -> np.ndarray:  # w_m, b_m as θ's
            return draw_param(name, shape, block, gen, scheme, weight_std)

        return in_param_order(new_params(shapes, draw, **settings), cfg)

    def draw_gcnet(name: str, shape: tuple[int, ...]) -> np.ndarray:
        return _draw_gcnet(name, shape, cfg, gen, scheme)

    return new_params(param_shapes(cfg), draw_gcnet, **settings)


def _draw_gcnet(
    name: str, shape: tuple[int, ...], cfg: GCNetConfig, gen: np.random.Generator, scheme: str
) -> np.ndarray:
    layer, kind = name.rsplit(".", 1)
    step = layer.rsplit(".", 1)[-1]  # mask, fc1, norm or fc2
    fan_in = {"mask": cfg.in_channels, "fc1": cfg.in_channels, "fc2": cfg.inter_channels}
    if scheme == "random":
        if step == "norm":
            return gen.uniform(0.5, 1.5, shape) if kind == "weight" else gen.normal(0, 0.2, shape)
        if kind == "weight":
            return gen.normal(0.0, 1.0 / np.sqrt(fan_in[step]), shape)
        return gen.normal(0.0, 0.2, shape)
    if step == "mask" and kind == "weight":  # Kaiming normal, fan in, gain √2 (mmcv's)
        return gen.normal(0.0, np.sqrt(2.0 / fan_in[step]), shape)
    if step == "fc1":  # PyTorch's default for a 1×1 conv: U(±1/√fan_in), weight and bias
        bound = 1.0 / np.sqrt(fan_in[step])
        return gen.uniform(-bound, bound, shape)
    if step == "norm":
        return np.ones(shape) if kind == "weight" else np.zeros(shape)
    return np.zeros(shape)  # b_k, and fc2: the last layer of each transform starts at zero


def check_forward(x: Array, params: Mapping[str, Array], cfg: FamilyConfig, training: Any) -> Any:
    """Check the arguments of a family block's ``forward``; return x's array namespace."""
    _check_config(cfg)
    # x: (B, C, *S), 1 to 3 spatial dims, float32 or float64, and DNL's pooling kernel fitting
    shape_of = cfg.nonlocal_config if isinstance(cfg, DNLConfig) else _no_pooling(cfg)
    xp = check_x(x, shape_of)
    check_params(params, cfg, x)
    check_training(training)
    return xp


def check_params(params: Mapping[str, Array], cfg: FamilyConfig, x: Array) -> Any:
    """``params`` has exactly the names of :func:`param_shapes`, each an array of that shape
    and of x's library and dtype; returns the shared array namespace."""
    return check_against(params, param_shapes(cfg), cfg, f"the {type(cfg).__name__}", x)


def trainable_names(cfg: FamilyConfig) -> tuple[str, ...]:
    """The names the block's ``backward`` returns gradients for (all but BN's buffers)."""
    return tuple(n for n in param_shapes(cfg) if n not in BUFFERS)


def _mask_shapes(cfg: FamilyConfig) -> dict[str, tuple[int, ...]]:
    """w_k, b_k (GCNet) or w_m, b_m (DNL): one logit per position."""
    return {"mask.weight": (1, cfg.in_channels), "mask.bias": (1,)}


def _no_pooling(cfg: GCNetConfig) -> Any:
    """What :func:`nlref.checks.check_x` reads of a config, for a block that never pools."""
    return types.SimpleNamespace(in_channels=cfg.in_channels, sub_sample=None)


def _check_config(cfg: Any) -> None:
    if not isinstance(cfg, (GCNetConfig, DNLConfig)):
        raise TypeError(f"cfg must be a GCNetConfig or a DNLConfig, got {type(cfg).__name__}")
