r"""Numerically stable softmax over the last axis.

Shapes: logits s of shape (B, N, N′), weights P of the same shape; each row sums to 1.

Forward
-------
.. math::

    P_{ij} = \frac{\exp(s_{ij} - m_i)}{\sum_k \exp(s_{ik} - m_i)},\qquad m_i = \max_k s_{ik}

Subtracting the row max changes nothing mathematically (it cancels) but keeps every
exponent ≤ 0, so nothing overflows.

Backward
--------
With :math:`\partial P_{ij}/\partial s_{ik} = P_{ij}(\delta_{jk} - P_{ik})`:

.. math::

    \bar s_{ik} = \sum_j \bar P_{ij} P_{ij}(\delta_{jk} - P_{ik})
               = P_{ik}\Big(\bar P_{ik} - \sum_j \bar P_{ij} P_{ij}\Big)
"""

from __future__ import annotations

from dataclasses import dataclass

from .._backend import Array, namespace

__all__ = ["SoftmaxCache", "backward", "forward"]


@dataclass(frozen=True)
class SoftmaxCache:
    """What :func:`backward` needs: the softmax output itself."""

    weights: Array  # (B, N, N'), rows sum to 1


def forward(s: Array) -> tuple[Array, SoftmaxCache]:
    """Softmax of ``s`` over its last axis, with the row max subtracted first."""
    xp = namespace(s)
    e = xp.exp(s - xp.max(s, axis=-1, keepdims=True))
    p = e / xp.sum(e, axis=-1, keepdims=True)
    return p, SoftmaxCache(weights=p)


def backward(dp: Array, cache: SoftmaxCache) -> Array:
    """Gradient with respect to the logits, given the gradient ``dp`` of the weights."""
    xp = namespace(dp)
    p = cache.weights
    return p * (dp - xp.sum(dp * p, axis=-1, keepdims=True))
