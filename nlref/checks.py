"""What :func:`nlref.forward` and :func:`nlref.backward` accept, checked at the boundary.

Bad input is refused here, before any arithmetic, with a ``TypeError`` or a ``ValueError``
that names what was expected and what was given (``docs/errors.md`` lists every case).
The block itself (:mod:`nlref.block`) can then be read as the plain formula.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ._backend import Array, check_plain_array, namespace
from .config import NonLocalConfig
from .params import check_params

__all__ = [
    "check_bn_eps",
    "check_cache",
    "check_config",
    "check_dz",
    "check_forward",
    "check_training",
    "check_x",
]


def check_forward(x: Array, params: Mapping[str, Array], cfg: NonLocalConfig, training: Any) -> Any:
    """Check the arguments of :func:`nlref.forward`; return x's array namespace."""
    check_config(cfg)
    xp = check_x(x, cfg)
    check_params(params, cfg, x)
    check_training(training)
    check_bn_eps(cfg, x, xp)
    return xp


def check_training(training: Any) -> None:
    """training: a bool (a NumPy bool is a bool)."""
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"training must be a bool, got {training!r} ({type(training).__name__})")


def check_bn_eps(cfg: NonLocalConfig, x: Array, xp: Any) -> None:
    """ε must not round to 0 in x's dtype (1e-50 in float32, say): batch norm's
    1/√(σ² + ε) would divide by zero on a channel of zero variance (a zero input)."""
    if cfg.norm != "batchnorm" or x.dtype != xp.float32:
        return  # every positive float is positive in float64
    if np.float32(cfg.bn_eps) == 0:
        tiny = float(np.finfo(np.float32).smallest_subnormal)
        raise ValueError(
            f"cfg.bn_eps={cfg.bn_eps!r} is 0 in float32, the dtype of x: batch norm's "
            "1/√(σ² + ε) would divide by zero on a channel of zero variance; use "
            f"bn_eps >= {tiny:.2g} (the smallest positive float32), or float64 input"
        )


def check_x(x: Array, cfg: NonLocalConfig) -> Any:
    """x: an array (B, C, *S) with C = cfg.in_channels, 1 to 3 spatial dims, nothing empty,
    float32 or float64, and a ``cfg.sub_sample`` that fits its spatial dims."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"x must be an array of shape (B, C, *S), got {type(x).__name__}")
    check_plain_array(x, "x")
    xp = namespace(x)
    shape = tuple(x.shape)
    expected = f"(B, C={cfg.in_channels}, *S) with 1 to 3 spatial dims"
    if not 3 <= len(shape) <= 5:
        raise ValueError(f"expected x of shape {expected}, got {len(shape)}-d shape {shape}")
    if shape[1] != cfg.in_channels:
        raise ValueError(
            f"expected x of shape {expected}, got {shape}: channel mismatch "
            f"({shape[1]} != cfg.in_channels={cfg.in_channels})"
        )
    if any(s == 0 for s in shape):
        raise ValueError(f"x must not be empty: got shape {shape}")
    if not xp.isdtype(x.dtype, "real floating") or x.dtype not in (xp.float32, xp.float64):
        raise TypeError(f"x must have a real floating dtype (float32 or float64), got {x.dtype}")
    spatial = shape[2:]
    if cfg.sub_sample is not None:
        if len(cfg.sub_sample) != len(spatial):
            raise ValueError(
                f"cfg.sub_sample={cfg.sub_sample} has {len(cfg.sub_sample)} entries but x has "
                f"{len(spatial)} spatial dims (S={spatial}); give one kernel size per dim"
            )
        too_big = [(k, s) for k, s in zip(cfg.sub_sample, spatial, strict=True) if k > s]
        if too_big:
            raise ValueError(
                f"cfg.sub_sample={cfg.sub_sample} is larger than the spatial size S={spatial}: "
                "pooling would leave zero key positions"
            )
    return xp


def check_config(cfg: Any) -> None:
    """cfg: a NonLocalConfig."""
    if not isinstance(cfg, NonLocalConfig):
        raise TypeError(f"cfg must be a NonLocalConfig, got {type(cfg).__name__}")


def check_cache(cache: Any, kind: type) -> None:
    """The cache must be the ``kind`` that the block's forward returns (a
    :class:`~nlref.block.BlockCache` for :func:`nlref.forward`)."""
    if not isinstance(cache, kind):
        raise TypeError(
            f"cache must be the {kind.__name__} returned by forward, got {type(cache).__name__}"
        )


def check_dz(dz: Array, like: Array, input_shape: tuple[int, ...], dtype: Any) -> Any:
    """dz: an array of z's shape, dtype and library (``like`` is an array of the forward)."""
    if not hasattr(dz, "shape") or not hasattr(dz, "dtype"):
        raise TypeError(f"dz must be an array, got {type(dz).__name__}")
    check_plain_array(dz, "dz")
    xp = namespace(dz, like)
    if tuple(dz.shape) != input_shape:
        raise ValueError(f"dz must have the shape of z, {input_shape}, got {tuple(dz.shape)}")
    if dz.dtype != dtype:
        raise TypeError(f"dz must have the dtype of z, {dtype}, got {dz.dtype}")
    return xp
