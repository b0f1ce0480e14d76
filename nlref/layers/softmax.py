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

The row sums Σⱼ P̄ᵢⱼPᵢⱼ are one ``vecdot`` per row (no (N, N′) temporary).

They could also be had as ȳᵢᵀyᵢ (the block knows ȳ and y = g Pᵀ), an O(C′·N) dot
instead of an O(N·N′) one, as FlashAttention does. nlref does not: when a row is one-hot
(logits far apart) Σⱼ P̄ᵢⱼPᵢⱼ is exactly the P̄ of the one key, so P̄ − Σ is exactly 0
there, while ȳᵢᵀyᵢ sums the same products in another order and leaves a rounding error
that θ̄ = αφs̄ᵀ multiplies by |φ| (wrong gradients for logits of 1e16 and more,
``tests/test_extremes.py``).
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
    row_max = xp.max(s, axis=-1, keepdims=True)  # m_i, (B, N, 1)
    e = xp.exp(s - row_max)  # exp(s_ij - m_i) <= 1
    inv_sum = 1.0 / xp.sum(e, axis=-1, keepdims=True)  # 1 / sum_k exp(s_ik - m_i)
    p = e * inv_sum
    return p, SoftmaxCache(weights=p)


def backward(dp: Array, cache: SoftmaxCache) -> Array:
    """Gradient with respect to the logits, given the gradient ``dp`` of the weights."""
    xp = namespace(dp)
    p = cache.weights
    row_dot = xp.vecdot(dp, p, axis=-1)[..., None]  # sum_j dP_ij P_ij, (B, N, 1)
    return (dp - row_dot) * p
