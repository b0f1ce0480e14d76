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

Implementation: the row sums Σⱼ P̄ᵢⱼPᵢⱼ are one ``vecdot`` (no (N, N′) temporary), and the
normalisation and the final product run in place on arrays this module allocated.

Recomputing from the row statistics
-----------------------------------
The forward also returns each row's max mᵢ and the reciprocal of its sum, rᵢ =
1 / Σₖ exp(sᵢₖ − mᵢ): two O(N) arrays (:class:`RowStats`). Given them (``rows=``), the
weights of the same logits are

.. math::

    P_{ij} = \exp(s_{ij} - m_i)\, r_i,

the same operations in the same order as the forward without its two row reductions, so
the same bits: this is how the block recomputes blocks of the attention in its backward.

The row sums Σⱼ P̄ᵢⱼPᵢⱼ could also be had as ȳᵢᵀyᵢ (the block knows ȳ and y = g Pᵀ),
an O(C′·N) dot instead of an O(N·N′) one, as FlashAttention does. nlref does not: when a
row is one-hot (logits far apart) Σⱼ P̄ᵢⱼPᵢⱼ is exactly the P̄ of the one key, so
P̄ − Σ is exactly 0 there, while ȳᵢᵀyᵢ sums the same products in another order and
leaves a rounding error that θ̄ = αφs̄ᵀ multiplies by |φ| (wrong gradients for logits
of 1e16 and more, ``tests/test_extremes.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .._backend import Array, namespace

__all__ = ["RowStats", "SoftmaxCache", "backward", "forward"]


@dataclass(frozen=True)
class RowStats:
    """Each row's max mᵢ and reciprocal sum rᵢ = 1 / Σₖ exp(sᵢₖ − mᵢ), (B, N, 1) each."""

    max: Array
    inv_sum: Array


@dataclass(frozen=True)
class SoftmaxCache:
    """What :func:`backward` needs: the softmax output itself; and the row statistics,
    from which :func:`forward` recomputes it."""

    weights: Array  # (B, N, N'), rows sum to 1
    rows: RowStats


def forward(
    s: Array, *, overwrite_input: bool = False, rows: RowStats | None = None
) -> tuple[Array, SoftmaxCache]:
    """Softmax of ``s`` over its last axis, with the row max subtracted first.

    With ``overwrite_input=True`` the caller hands ``s`` over as scratch space: the row max
    is subtracted from it in place (one (B, N, N′) array fewer); it is never modified
    otherwise. With ``rows``, the :class:`RowStats` of an earlier forward on the same
    logits, the two row reductions are skipped (same result, same bits).
    """
    xp = namespace(s)
    row_max = xp.max(s, axis=-1, keepdims=True) if rows is None else rows.max  # m_i
    if overwrite_input:
        s -= row_max
        shifted = s
    else:
        shifted = s - row_max
    p = xp.exp(shifted)  # exp(s_ij - m_i) <= 1: a new array
    del shifted
    if rows is None:
        rows = RowStats(max=row_max, inv_sum=1.0 / xp.sum(p, axis=-1, keepdims=True))
    p *= rows.inv_sum  # in place: p is ours; (B, N, 1) reciprocals
    return p, SoftmaxCache(weights=p, rows=rows)


def backward(dp: Array, cache: SoftmaxCache, *, overwrite_input: bool = False) -> Array:
    """Gradient with respect to the logits, given the gradient ``dp`` of the weights.

    With ``overwrite_input=True`` the result is computed in ``dp``'s memory (and returned);
    ``dp`` is never modified otherwise.
    """
    xp = namespace(dp)
    p = cache.weights
    row_dot = xp.vecdot(dp, p, axis=-1)[..., None]  # sum_j dP_ij P_ij, (B, N, 1)
    if overwrite_input:
        dp -= row_dot
        ds = dp
    else:
        ds = dp - row_dot  # a new array
    ds *= p  # in place: ds is ours (or handed over)
    return ds
