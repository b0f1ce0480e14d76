"""The configurations of the family's blocks: :class:`GCNetConfig` and :class:`DNLConfig`.

One class per block, not a ``family=`` field on :class:`nlref.NonLocalConfig`: the blocks
have different knobs (GCNet has no θ, φ, g, pairwise function or key pooling; it has a
pooling type, fusions and a layer norm), so one class for all would carry fields that mean
nothing for most values of ``family`` and would need a rule for every such pair. With a
class per block every field means something, every invalid combination is unrepresentable
or refused in one place, and :func:`nlref.forward` can never be handed a family config by
mistake (it accepts only a :class:`~nlref.NonLocalConfig`). The disentangled block *is* a
Non-local block with two changes, so :class:`DNLConfig` builds the
:class:`~nlref.NonLocalConfig` of its shared part (:attr:`DNLConfig.nonlocal_config`) and
the block reuses the Non-local block's steps with it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..config import BIAS_LAYERS, NonLocalConfig, positive_float, positive_int

__all__ = ["FUSIONS", "POOLINGS", "DNLConfig", "GCNetConfig"]

POOLINGS = ("att", "avg")
FUSIONS = ("channel_add", "channel_mul")


@dataclass(frozen=True)
class GCNetConfig:
    r"""Everything that fixes the numbers a global context block (GCNet) computes.

    Parameters
    ----------
    in_channels : int
        C, the channels of the input ``x`` of shape (B, C, \*S), 1 to 3 spatial dims.
    inter_channels : int, optional
        C′, the bottleneck of each transform. Default ``max(in_channels // 16, 1)`` (the
        paper's ratio 1/16). mmcv uses ``int(C * ratio)``, timm
        ``make_divisible(C * rd_ratio, rd_divisor, round_limit=0)``.
    pooling : {"att", "avg"}
        The global context: ``"att"`` weights the positions by softmax(w_kᵀxⱼ + b_k),
        ``"avg"`` averages them.
    fusion : tuple of {"channel_add", "channel_mul"}
        How the context reaches x: ``z = x + t`` (``channel_add``), ``z = x · σ(t′)``
        (``channel_mul``), or both, ``z = x · σ(t′) + t`` (mmcv's and timm's order).
    ln_eps : float
        ε of the layer norm in each transform: 1e-5 in mmcv (``nn.LayerNorm``), 1e-6 in timm
        (``LayerNorm2d``).
    """

    in_channels: int
    inter_channels: int | None = None
    pooling: str = "att"
    fusion: tuple[str, ...] = ("channel_add",)
    ln_eps: float = 1e-5

    def __post_init__(self) -> None:
        object.__setattr__(self, "in_channels", positive_int("in_channels", self.in_channels))
        if self.inter_channels is None:
            object.__setattr__(self, "inter_channels", max(self.in_channels // 16, 1))
        object.__setattr__(
            self, "inter_channels", positive_int("inter_channels", self.inter_channels)
        )
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if isinstance(self.fusion, str) or not isinstance(self.fusion, (tuple, list)):
            raise TypeError(
                f"fusion must be a tuple of names from {FUSIONS}, e.g. ('channel_add',); "
                f"got {self.fusion!r}"
            )
        unknown = [f for f in self.fusion if f not in FUSIONS]
        if unknown or not self.fusion:
            raise ValueError(
                f"fusion must name one or both of {FUSIONS}, got {tuple(self.fusion)!r}"
            )
        object.__setattr__(self, "fusion", tuple(f for f in FUSIONS if f in self.fusion))
        object.__setattr__(self, "ln_eps", positive_float("ln_eps", self.ln_eps))

    def to_dict(self) -> dict[str, object]:
        """The fields as a JSON-ready dict; ``GCNetConfig(**d)`` rebuilds the config."""
        return _json_fields(self)


@dataclass(frozen=True)
class DNLConfig:
    r"""Everything that fixes the numbers a disentangled non-local block (DNL) computes.

    The fields shared with the Non-local block mean what they mean in
    :class:`nlref.NonLocalConfig`, for the embedded Gaussian; ``sub_sample`` and
    ``pool_order`` also apply to the unary term's logits (see :mod:`nlref.family.dnl`).

    Parameters
    ----------
    in_channels, inter_channels, sub_sample, pool_order, norm, bn_eps, bn_momentum, biases
        As in :class:`nlref.NonLocalConfig` (C′ defaults to C/2). The unary term's 1×1
        projection (``mask``) always has a bias, as in mmsegmentation.
    scale : float, optional
        α, a factor on the whitened logits; ``None`` means 1. mmsegmentation's
        ``use_scale=True`` is 1/√C′ rounded to float32 (:func:`nlref.interop.mmseg_scale`).
    temperature : float
        τ, dividing the whitened logits: A = softmax_j(α (θᵢ − μ_θ)ᵀ(φⱼ − μ_φ) / τ). Default 1;
        mmsegmentation's ``DNLHead`` uses 0.05.

    Attributes
    ----------
    nonlocal_config : NonLocalConfig
        The Non-local block this DNL shares its steps with: the embedded Gaussian with the
        same fields and ``scale = effective_scale``.
    """

    in_channels: int
    inter_channels: int | None = None
    scale: float | None = None
    temperature: float = 1.0
    sub_sample: tuple[int, ...] | None = None
    pool_order: str = "after_projection"
    norm: str | None = "batchnorm"
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    biases: tuple[str, ...] = BIAS_LAYERS
    nonlocal_config: NonLocalConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        shared = {f: getattr(self, f) for f in _SHARED_FIELDS}
        block = NonLocalConfig(pairwise="embedded_gaussian", **shared)  # validates them all
        for name in _SHARED_FIELDS:  # the normalised values (C′ default, tuples, floats)
            object.__setattr__(self, name, getattr(block, name))
        object.__setattr__(self, "temperature", positive_float("temperature", self.temperature))
        effective = self.effective_scale
        if not math.isfinite(effective):
            raise ValueError(
                f"scale / temperature must be finite, got {effective!r} "
                f"(scale={self.scale!r}, temperature={self.temperature!r})"
            )
        object.__setattr__(self, "nonlocal_config", dataclasses.replace(block, scale=effective))

    @property
    def effective_scale(self) -> float:
        """The factor on the whitened logits, α / τ (α = 1 when ``scale`` is None)."""
        return (1.0 if self.scale is None else self.scale) / self.temperature

    def to_dict(self) -> dict[str, object]:
        """The fields as a JSON-ready dict; ``DNLConfig(**d)`` rebuilds the config."""
        return _json_fields(self)


def _json_fields(cfg: object) -> dict[str, object]:
    """The init fields of a config dataclass, tuples as lists."""
    out: dict[str, object] = {}
    for f in dataclasses.fields(cfg):  # type: ignore[arg-type]
        if f.init:
            value = getattr(cfg, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


_SHARED_FIELDS = (
    "in_channels",
    "inter_channels",
    "scale",
    "sub_sample",
    "pool_order",
    "norm",
    "bn_eps",
    "bn_momentum",
    "biases",
)
