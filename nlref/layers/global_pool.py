r"""Global average pooling: the mean over every spatial position, per sample and channel.

Shapes: input h of shape (B, C, \*S) with N = prod(S) positions, output o of shape (B, C).

Forward
-------
.. math::

    o_{b,c} = \frac1N \sum_n h_{b,c,n}.

Backward
--------
Every position contributes to the mean with weight 1/N:

.. math::

    \bar h_{b,c,n} = \frac{\bar o_{b,c}}{N}.

GCNet's ``pooling="avg"`` context is this layer (:mod:`nlref.family.gcnet`). It is also what
makes a purely local model *additive*: if each position's feature depends only on a small
window, the pooled vector is a sum of terms that each see one window (see
:mod:`nlref.demo.toy`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._backend import Array, namespace

__all__ = ["GlobalPoolCache", "backward", "forward"]


@dataclass(frozen=True)
class GlobalPoolCache:
    """What :func:`backward` needs: the input's shape."""

    input_shape: tuple[int, ...]  # (B, C, *S)


def forward(h: Array) -> tuple[Array, GlobalPoolCache]:
    """Mean of ``h`` (B, C, \\*S) over its spatial axes; returns (B, C) and the cache."""
    if len(h.shape) < 3:
        raise ValueError(f"expected h of shape (B, C, *S) with >= 1 spatial dim, got {h.shape}")
    xp = namespace(h)
    b, c = h.shape[0], h.shape[1]
    o = xp.mean(xp.reshape(h, (b, c, -1)), axis=2)
    return o, GlobalPoolCache(input_shape=tuple(h.shape))


def backward(dout: Array, cache: GlobalPoolCache) -> Array:
    """Gradient with respect to the input (B, C, \\*S), given ``dout`` of shape (B, C)."""
    xp = namespace(dout)
    b, c, *spatial = cache.input_shape
    n = math.prod(spatial)
    # forward was: o = sum_n h_n / N
    dh = xp.broadcast_to(dout[:, :, None] / n, (b, c, n))
    return xp.reshape(dh, cache.input_shape)
