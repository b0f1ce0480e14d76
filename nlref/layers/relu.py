r"""The rectifier ReLU(h) = max(h, 0), elementwise, on an array of any shape.

Forward
-------
.. math::

    o = \max(h, 0) = m \odot h,\qquad m = [h > 0].

Backward
--------
ReLU is piecewise linear, with slope 1 where h > 0 and 0 where h < 0:

.. math::

    \bar h = m \odot \bar o.

At h = 0 the function has no derivative; like PyTorch, the subgradient 0 is used there.
A finite-difference check must draw h away from 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._backend import Array, namespace

__all__ = ["ReluCache", "backward", "forward"]


@dataclass(frozen=True)
class ReluCache:
    """What :func:`backward` needs: where the input was positive."""

    active: Array  # bool, the shape of the input, h > 0


def forward(h: Array) -> tuple[Array, ReluCache]:
    """Return ``max(h, 0)`` and the cache."""
    xp = namespace(h)
    active = h > 0
    return xp.where(active, h, xp.zeros_like(h)), ReluCache(active=active)


def backward(dout: Array, cache: ReluCache) -> Array:
    """Gradient with respect to the input, given the gradient ``dout`` of the output."""
    xp = namespace(dout)
    # forward was: o = m * h with m = [h > 0]
    return xp.where(cache.active, dout, xp.zeros_like(dout))
