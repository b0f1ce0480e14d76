r"""Whitening over positions: each channel minus its mean over the positions.

Shapes: u of shape (B, C, N), output of the same shape. The disentangled non-local block
whitens its queries θ and keys φ this way before comparing them.

Forward
-------
.. math::

    \mu_{bc} = \frac1N \sum_n u_{bcn},\qquad \hat u_{bcn} = u_{bcn} - \mu_{bc}.

Backward
--------
Every :math:`u_{bcm}` reaches :math:`\hat u_{bcn}` directly (weight δ_{mn}) and through the
mean (weight −1/N):

.. math::

    \bar u_{bcm} = \bar{\hat u}_{bcm} - \frac1N \sum_n \bar{\hat u}_{bcn}.

The map is a linear projection (it is its own transpose and its own square), so the
backward is the forward applied to the gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._backend import Array, namespace

__all__ = ["WhitenCache", "backward", "forward"]


@dataclass(frozen=True)
class WhitenCache:
    """The mean that was subtracted (not needed by :func:`backward`, kept to be shown)."""

    mean: Array  # μ, (B, C, 1)


def forward(u: Array) -> tuple[Array, WhitenCache]:
    """Return ``u − mean_n(u)`` (B, C, N) and the cache."""
    mean = namespace(u).mean(u, axis=-1, keepdims=True)
    return u - mean, WhitenCache(mean=mean)


def backward(du_hat: Array, cache: WhitenCache) -> Array:
    """Gradient with respect to u, given the gradient of the whitened ``u − μ``."""
    # forward was: û = u - mean_n(u); the same projection applied to the gradient
    return du_hat - namespace(du_hat).mean(du_hat, axis=-1, keepdims=True)
