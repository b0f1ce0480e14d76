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
    # y = g A^T, computed as y^T = A g^T: the same product, with the (N, N') operand in
    # its own row-major layout (faster for BLAS when C' is small); y is a transposed view
    y = xp.matrix_transpose(xp.matmul(attention, xp.matrix_transpose(values)))
    return y, AggregateCache(attention=attention, values=values)


def backward(dy: Array, cache: AggregateCache) -> tuple[Array, Array]:
    """Return ``(dA, dg)`` for the upstream gradient ``dy`` of shape (B, C′, N)."""
    xp = namespace(dy)
    # forward was: y = g A^T
    dattention = xp.matmul(xp.matrix_transpose(dy), cache.values)  # (B, N, C') @ (B, C', N')
    # dg = dy A, computed as dg^T = A^T dy^T (faster for BLAS); a transposed view
    dvalues = xp.matrix_transpose(
        xp.matmul(xp.matrix_transpose(cache.attention), xp.matrix_transpose(dy))
    )  # (B, C', N')
    return dattention, dvalues
