"""The configuration of one Non-local block: :class:`NonLocalConfig`."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from .layers.maxpool import output_size

__all__ = ["BIAS_LAYERS", "NORMS", "POOL_ORDERS", "NonLocalConfig"]

POOL_ORDERS = ("after_projection", "before_projection")
NORMS = ("batchnorm", None)
BIAS_LAYERS = ("theta", "phi", "g", "z")


@dataclass(frozen=True)
class NonLocalConfig:
    r"""Everything that fixes the numbers a Non-local block computes, except its weights.

    Parameters
    ----------
    in_channels : int
        C, the channels of the input ``x`` of shape (B, C, \*S).
    inter_channels : int, optional
        C′, the channels of θ, φ and g. Default ``max(in_channels // 2, 1)`` (the paper's C/2).
    pairwise : str
        One of the registered pairwise functions (see :func:`nlref.pairwise.names`):
        ``"gaussian"``, ``"embedded_gaussian"``, ``"dot_product"``, ``"concatenation"``.
    scale : float, optional
        A factor multiplying θᵢᵀφⱼ (xᵢᵀxⱼ for the Gaussian) before normalisation. ``None``
        means 1, as in the paper; 1/√C′ reproduces the softmax modes of the Caffe2 code, mmcv
        and pytorchvideo, 1/√C reproduces timm (their dot-product modes are unscaled). The
        concatenation variant has no θᵢᵀφⱼ term, so a scale there is refused.
    sub_sample : tuple of int, optional
        Max-pool kernel (= stride) per spatial dim on the key side (φ and g), or ``None`` for
        no pooling. Odd sizes are floored, as PyTorch does. Its length must equal the number
        of spatial dims of ``x``; this is checked in :func:`nlref.forward`.
    pool_order : {"after_projection", "before_projection"}
        ``"after_projection"``: φ = pool(W_φ x), g = pool(W_g x) (the paper, AlexHex7, mmcv).
        ``"before_projection"``: φ = W_φ pool(x), g = W_g pool(x) (the authors' Caffe2 code,
        pytorchvideo, SlowFast). The two differ because max does not commute with a 1×1
        projection that mixes channels.
    norm : {"batchnorm", None}
        Batch norm after W_z, or nothing.
    bn_eps, bn_momentum : float
        As in ``torch.nn.BatchNorm*d``.
    biases : tuple of str
        The layers among ``("theta", "phi", "g", "z")`` that have a bias. A layer not listed
        has no bias, and its ``<layer>.bias`` key must be absent from the params (mmcv, for
        example, has no ``z.bias`` when a norm follows).

    Examples
    --------
    >>> import nlref
    >>> cfg = nlref.NonLocalConfig(in_channels=64, pairwise="dot_product", sub_sample=(2, 2))
    >>> cfg.inter_channels
    32
    """

    in_channels: int
    inter_channels: int | None = None
    pairwise: str = "embedded_gaussian"
    scale: float | None = None
    sub_sample: tuple[int, ...] | None = None
    pool_order: str = "after_projection"
    norm: str | None = "batchnorm"
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    biases: tuple[str, ...] = field(default=BIAS_LAYERS)

    def __post_init__(self) -> None:
        from .pairwise import get as _get_pairwise  # late import: the registry imports layers

        object.__setattr__(self, "in_channels", positive_int("in_channels", self.in_channels))
        if self.inter_channels is None:
            object.__setattr__(self, "inter_channels", max(self.in_channels // 2, 1))
        inter = positive_int("inter_channels", self.inter_channels)
        object.__setattr__(self, "inter_channels", inter)

        variant = _get_pairwise(self.pairwise)  # raises ValueError listing the names

        if self.scale is not None:
            scale = _real("scale", self.scale, "a float or None")
            if not math.isfinite(scale) or scale <= 0:
                raise ValueError(f"scale must be a finite positive float, got {_show(self.scale)}")
            if not variant.uses_scale:
                raise ValueError(
                    f"pairwise={self.pairwise!r} has no θᵢᵀφⱼ term for a scale to multiply; "
                    f"use scale=None (got scale={_show(self.scale)})"
                )
            object.__setattr__(self, "scale", scale)

        if self.sub_sample is not None:
            if isinstance(self.sub_sample, int) or not isinstance(self.sub_sample, (tuple, list)):
                raise TypeError(
                    "sub_sample must be None or one int per spatial dim, e.g. (2, 2); "
                    f"got {self.sub_sample!r}"
                )
            ks = tuple(self.sub_sample)
            if not 1 <= len(ks) <= 3:
                raise ValueError(
                    f"sub_sample must have 1 to 3 entries (one per spatial dim), got {ks!r}"
                )
            if any(not is_integer(k) or k < 1 for k in ks):
                raise ValueError(f"sub_sample entries must be ints >= 1, got {ks!r}")
            object.__setattr__(self, "sub_sample", tuple(int(k) for k in ks))

        if self.pool_order not in POOL_ORDERS:
            raise ValueError(f"pool_order must be one of {POOL_ORDERS}, got {self.pool_order!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        eps = positive_float("bn_eps", self.bn_eps)
        momentum = _real("bn_momentum", self.bn_momentum, "a float in [0, 1]")
        if not 0 <= momentum <= 1:
            raise ValueError(
                f"bn_momentum must be a float in [0, 1], got {_show(self.bn_momentum)}"
            )
        object.__setattr__(self, "bn_eps", eps)
        object.__setattr__(self, "bn_momentum", momentum)

        if isinstance(self.biases, str) or not isinstance(self.biases, (tuple, list, set)):
            raise TypeError(f"biases must be a tuple of layer names, got {self.biases!r}")
        unknown = [b for b in self.biases if b not in BIAS_LAYERS]
        if unknown:
            raise ValueError(
                f"biases may only name layers in {BIAS_LAYERS}, got unknown {unknown!r}"
            )
        object.__setattr__(self, "biases", tuple(b for b in BIAS_LAYERS if b in self.biases))

    def to_dict(self) -> dict[str, object]:
        """The fields as a JSON-ready dict (tuples become lists); ``NonLocalConfig(**d)``
        rebuilds the config."""
        return {
            "in_channels": self.in_channels,
            "inter_channels": self.inter_channels,
            "pairwise": self.pairwise,
            "scale": self.scale,
            "sub_sample": None if self.sub_sample is None else list(self.sub_sample),
            "pool_order": self.pool_order,
            "norm": self.norm,
            "bn_eps": self.bn_eps,
            "bn_momentum": self.bn_momentum,
            "biases": list(self.biases),
        }

    @property
    def effective_scale(self) -> float:
        """The factor applied to θᵢᵀφⱼ: ``scale``, or 1.0 when ``scale`` is None."""
        return 1.0 if self.scale is None else self.scale

    def key_shape(self, spatial: tuple[int, ...] | list[int]) -> tuple[int, ...]:
        """The keys' spatial shape for queries on the grid ``spatial``: ``spatial`` after the
        max-pool of ``sub_sample`` (floor), or ``spatial`` itself; N′ is its product."""
        if self.sub_sample is None:
            return tuple(spatial)
        return output_size(tuple(spatial), self.sub_sample)

    @property
    def embeds(self) -> bool:
        """Whether the pairwise function uses the θ and φ projections (all but Gaussian)."""
        from .pairwise import get as _get_pairwise

        return _get_pairwise(self.pairwise).embeds


def is_integer(value: object) -> bool:
    """Whether ``value`` is an integer for nlref's arguments: a Python or NumPy int (any
    ``numbers.Integral``), but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def optional_count(name: str, value: object, expected: str) -> int | None:
    """``value`` as a Python int >= 1, or None: the type is checked as :func:`is_integer`
    does. ``expected`` completes the message "``name`` must be None or ..."."""
    if value is None:
        return None
    if not is_integer(value):
        raise TypeError(f"{name} must be None or {expected}, got {_show(value, always=True)}")
    if value < 1:  # type: ignore[operator]
        raise ValueError(f"{name} must be None or {expected}, got {value}")
    return int(value)  # type: ignore[call-overload]


def _show(value: object, always: bool = False) -> str:
    """``repr(value)``, shortened when long (an int of 400 digits), with the type's name
    where the repr does not show it (NumPy scalars show theirs), or ``always``."""
    text = repr(value)
    if len(text) > 40:
        text = f"{text[:12]}… ({len(text)} characters)"
    plain = type(value) in (int, float, str) or type(value).__module__ == "numpy"
    if always or not plain:
        text += f" ({type(value).__name__})"
    return text


def _real(name: str, value: object, expected: str) -> float:
    """``value`` as a Python float: any real number (``numbers.Real``, a Python or NumPy int
    or float) but a bool; inf when it is too large for a float."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {_show(value)}")
    try:
        return float(value)
    except OverflowError:  # an int beyond float's range
        return math.inf


def positive_float(name: str, value: object) -> float:
    """``value`` as a finite positive Python float: any real number but a bool."""
    number = _real(name, value, "a finite positive float")
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a finite positive float, got {_show(value)}")
    return number


def positive_int(name: str, value: object) -> int:
    """``value`` as a Python int >= 1: a Python or NumPy int, but not a bool."""
    if not is_integer(value):
        raise TypeError(f"{name} must be an int, got {_show(value)}")
    if value < 1:  # type: ignore[operator]
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)  # type: ignore[call-overload]
