r"""Attention pooling: one softmax over the positions, shared by every query.

Shapes: logits m of shape (B, 1, N) (one score per position), values v of shape
(B, C, N), output c of shape (B, C, 1). GCNet's global context (v = x) and the unary term
of the disentangled non-local block (v = g) are this layer: the attention of the
Non-local block with a single row, the same for every query.

Forward
-------
A softmax (:mod:`~nlref.layers.softmax`) and an aggregation
(:mod:`~nlref.layers.aggregate`) with one query row:

.. math::

    \alpha_j = \frac{\exp m_j}{\sum_k \exp m_k},\qquad c = \sum_j \alpha_j\, v_j
    \quad (c = v\,\alpha^\top).

Backward
--------
The two layers' backwards in reverse:

.. math::

    \bar\alpha_j = \bar c^\top v_j,\quad \bar v_j = \alpha_j\,\bar c,\qquad
    \bar m_j = \alpha_j\Big(\bar\alpha_j - \sum_k \alpha_k\,\bar\alpha_k\Big).
"""

from __future__ import annotations

from dataclasses import dataclass

from .._backend import Array
from . import aggregate, softmax

__all__ = ["AttentionPoolCache", "backward", "forward"]


@dataclass(frozen=True)
class AttentionPoolCache:
    """The caches of the two steps: the softmax, then the weighted sum."""

    softmax: softmax.SoftmaxCache
    aggregate: aggregate.AggregateCache

    @property
    def weights(self) -> Array:
        """α, the pooling weights, (B, 1, N); each row sums to 1."""
        return self.aggregate.attention


def forward(logits: Array, values: Array) -> tuple[Array, AttentionPoolCache]:
    """Return ``c = Σⱼ softmax(m)ⱼ vⱼ`` of shape (B, C, 1) and the cache."""
    alpha, softmax_cache = softmax.forward(logits)  # (B, 1, N)
    c, aggregate_cache = aggregate.forward(alpha, values)  # v αᵀ, (B, C, 1)
    return c, AttentionPoolCache(softmax=softmax_cache, aggregate=aggregate_cache)


def backward(dc: Array, cache: AttentionPoolCache) -> tuple[Array, Array]:
    """Return ``(dlogits, dvalues)`` for the upstream gradient ``dc`` of shape (B, C, 1)."""
    dalpha, dvalues = aggregate.backward(dc, cache.aggregate)  # forward was: c = v αᵀ
    dlogits = softmax.backward(dalpha, cache.softmax)  # forward was: α = softmax(m)
    return dlogits, dvalues
