r"""The registry of pairwise functions f(·,·) with their normalisation C(x).

Every variant lives in one module of this package and registers a :class:`Pairwise`
there. Modules are discovered automatically, so adding a variant means adding one file:
the block, the gradient check, the cost model (:mod:`nlref.engine.cost`), the engine and
the command line read everything they need from the registered :class:`Pairwise`, and
never test a variant's name.

A variant maps queries θ (B, C′, N) and keys φ (B, C′, N′) (for the Gaussian, x itself
and pool(x)) to the normalised attention A = f / C(x) of shape (B, N, N′), and back:

- ``forward(theta, phi, extra, scale) -> (attention, cache)``, where ``extra`` maps the
  names of the variant's own parameters (:attr:`Pairwise.extra_params`) to arrays;
- ``backward(dattention, cache) -> PairwiseGrads``.

Both are plain formulas: no in-place updates, no options for speed. A softmax variant
(C(x) = Σⱼ f) also declares its **logits** step s = logits(θ, φ), so that A =
softmax(s): the engine (:mod:`nlref.engine`) then runs the softmax in place on arrays it
made itself and recomputes tiles of A from row statistics, with the same formulas.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .._backend import Array

__all__ = [
    "Logits",
    "Pairwise",
    "PairwiseGrads",
    "all_variants",
    "get",
    "names",
    "register",
    "unregister",
]


@dataclass(frozen=True)
class PairwiseGrads:
    """Gradients of a pairwise function.

    Attributes
    ----------
    dtheta : array, shape (B, C′, N)
    dphi : array, shape (B, C′, N′)
    dextra : dict
        Gradients of the variant's own parameters, keyed like ``extra_params``.
    """

    dtheta: Array
    dphi: Array
    dextra: dict[str, Array] = field(default_factory=dict)


@dataclass(frozen=True)
class Logits:
    """The step before the softmax of a softmax variant: s = logits(θ, φ) (B, N, N′).

    Attributes
    ----------
    forward : callable
        ``forward(theta, phi, extra, scale) -> (s, cache)``.
    backward : callable
        ``backward(ds, cache) -> PairwiseGrads``.
    """

    forward: Callable[[Array, Array, Mapping[str, Array], float], tuple[Array, Any]]
    backward: Callable[[Array, Any], PairwiseGrads]


@dataclass(frozen=True)
class Pairwise:
    """One registered pairwise function.

    Attributes
    ----------
    name : str
        The name used in :class:`nlref.NonLocalConfig` (``pairwise=...``).
    formula : str
        f and C(x), in plain text, for tables and the CLI.
    order : int
        Position in listings (the paper's order).
    embeds : bool
        True when θ and φ are learned projections; False for the Gaussian, which uses x.
    uses_scale : bool
        True when f contains θᵢᵀφⱼ, so that ``NonLocalConfig.scale`` applies.
    forward, backward : callable
        See the module docstring.
    has_logits : bool
        For the cost model: f contains an inner product θᵢᵀφⱼ per query–key pair, a
        (B, N, N′) matrix product that a tiled backward computes again.
    pair_flops : callable
        For the cost model: ``pair_flops(channels) -> int``, the FLOPs (2 per
        multiply-add) of the matrix products of f per query–key pair in the forward, for
        an inner product over ``channels`` (C′, or C for the Gaussian). The backward costs
        twice that.
    softmax : bool
        True when C(x) = Σⱼ f: A = softmax(logits(θ, φ)) and every row sums to 1; False
        when C(x) does not depend on f (N′).
    logits : Logits or None
        The step before the softmax; required when ``softmax`` is True.
    extra_params : callable
        ``extra_params(inter_channels) -> {name: shape}`` for the variant's own trainable
        parameters (``{"concat.weight": (2C′,)}`` for concatenation).
    """

    name: str
    formula: str
    order: int
    embeds: bool
    uses_scale: bool
    forward: Callable[[Array, Array, Mapping[str, Array], float], tuple[Array, Any]]
    backward: Callable[[Array, Any], PairwiseGrads]
    has_logits: bool
    pair_flops: Callable[[int], int]
    softmax: bool = False
    logits: Logits | None = None
    extra_params: Callable[[int], dict[str, tuple[int, ...]]] = lambda inter_channels: {}

    def __post_init__(self) -> None:
        if self.softmax and self.logits is None:
            raise ValueError(f"softmax variant {self.name!r} must declare its logits step")


_REGISTRY: dict[str, Pairwise] = {}


def register(variant: Pairwise) -> Pairwise:
    """Add ``variant`` to the registry (called at import time by each variant module)."""
    if variant.name in _REGISTRY and _REGISTRY[variant.name] is not variant:
        raise ValueError(f"a pairwise function named {variant.name!r} is already registered")
    _REGISTRY[variant.name] = variant
    return variant


def unregister(name: str) -> None:
    """Remove the variant called ``name`` (for variants registered by tests or notebooks)."""
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    """The registered variant names, in the paper's order."""
    return tuple(v.name for v in all_variants())


def all_variants() -> tuple[Pairwise, ...]:
    """The registered variants, in the paper's order."""
    return tuple(sorted(_REGISTRY.values(), key=lambda v: (v.order, v.name)))


def get(name: str) -> Pairwise:
    """Return the variant called ``name``.

    Raises
    ------
    ValueError
        If no variant has that name; the message lists the registered names.
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown pairwise function {name!r}; expected one of {names()}")
    return _REGISTRY[name]


for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
