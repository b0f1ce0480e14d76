r"""Attention-weighted sum of the values: :math:`y_i = \sum_j A_{ij}\, g_j`.

Shapes: attention A of shape (B, N, N′) (already normalised by C(x)), values g of shape
(B, C′, N′), output y of shape (B, C′, N).

Forward
-------
.. math::

    y_{b,c,i} = \sum_j A_{b,i,j}\, g_{b,c,j} \qquad (y_b = g_b A_b^\top)

Backward
--------
.. math::

    \bar g_b = \bar y_b A_b \quad (C′, N′),\qquad
    \bar A_b = \bar y_b^\top g_b \quad (N, N′)
"""

from __future__ import annotations

from dataclasses import dataclass

from .._backend import Array, namespace

__all__ = ["AggregateCache", "backward", "forward"]


@dataclass(frozen=True)
class AggregateCache:
    """What :func:`backward` needs from :func:`forward`."""

    attention: Array  # (B, N, N')
    values: Array  # (B, C', N')


def forward(attention: Array, values: Array) -> tuple[Array, AggregateCache]:
    """Return ``y = g Aᵀ`` of shape (B, C′, N) and the cache."""
    xp = namespace(attention, values)
    y = xp.matmul(values, xp.matrix_transpose(attention))  # (B, C', N') @ (B, N', N)
    return y, AggregateCache(attention=attention, values=values)


def backward(dy: Array, cache: AggregateCache) -> tuple[Array, Array]:
    """Return ``(dA, dg)`` for the upstream gradient ``dy`` of shape (B, C′, N)."""
    xp = namespace(dy)
    # forward was: y = g A^T
    dattention = xp.matmul(xp.matrix_transpose(dy), cache.values)  # (B, N, C') @ (B, C', N')
    dvalues = xp.matmul(dy, cache.attention)  # (B, C', N) @ (B, N, N')
    return dattention, dvalues
