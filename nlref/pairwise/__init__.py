r"""The registry of pairwise functions f(·,·) with their normalisation C(x).

Every variant lives in one module of this package and registers a :class:`Pairwise`
there. Modules are discovered automatically, so adding a variant means adding one file;
the tests, the gradient-check CLI and the docs iterate over :func:`names`.

A variant maps queries θ (B, C′, N) and keys φ (B, C′, N′) (for the Gaussian, x itself
and pool(x)) to the normalised attention A = f / C(x) of shape (B, N, N′), and back:

- ``forward(theta, phi, extra, scale) -> (attention, cache)``, where ``extra`` maps the
  names of the variant's own parameters (:attr:`Pairwise.extra_params`) to arrays;
- ``backward(dattention, cache) -> PairwiseGrads``. A backward that also accepts the
  keyword ``overwrite_input`` gets ``overwrite_input=True`` from the block, which hands
  over the array it made itself: the variant may then compute in its memory.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .._backend import Array

__all__ = ["Pairwise", "PairwiseGrads", "all_variants", "get", "names", "register"]


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
    softmax : bool
        True when C(x) = Σⱼ f (rows of the attention sum to 1); False when C(x) = N′.
        A softmax variant's forward also takes ``rows=`` (the row statistics of an
        earlier forward, its cache's ``rows``) to recompute the same attention without
        the row reductions.
    extra_params : callable
        ``extra_params(inter_channels) -> {name: shape}`` for the variant's own trainable
        parameters (``{"concat.weight": (2C′,)}`` for concatenation).
    forward, backward : callable
        See the module docstring.
    """

    name: str
    formula: str
    order: int
    embeds: bool
    uses_scale: bool
    softmax: bool
    forward: Callable[[Array, Array, Mapping[str, Array], float], tuple[Array, Any]]
    backward: Callable[..., PairwiseGrads]
    extra_params: Callable[[int], dict[str, tuple[int, ...]]] = lambda inter_channels: {}


_REGISTRY: dict[str, Pairwise] = {}


def register(variant: Pairwise) -> Pairwise:
    """Add ``variant`` to the registry (called at import time by each variant module)."""
    if variant.name in _REGISTRY and _REGISTRY[variant.name] is not variant:
        raise ValueError(f"a pairwise function named {variant.name!r} is already registered")
    _REGISTRY[variant.name] = variant
    return variant


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
