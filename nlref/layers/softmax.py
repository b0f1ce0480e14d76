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
"""

from __future__ import annotations

from dataclasses import dataclass

from .._backend import Array, namespace

__all__ = ["SoftmaxCache", "backward", "forward"]


@dataclass(frozen=True)
class SoftmaxCache:
    """What :func:`backward` needs: the softmax output itself."""

    weights: Array  # (B, N, N'), rows sum to 1


def forward(s: Array, *, overwrite_input: bool = False) -> tuple[Array, SoftmaxCache]:
    """Softmax of ``s`` over its last axis, with the row max subtracted first.

    With ``overwrite_input=True`` the caller hands ``s`` over as scratch space: the row max
    is subtracted from it in place (one (B, N, N′) array fewer); it is never modified
    otherwise.
    """
    xp = namespace(s)
    row_max = xp.max(s, axis=-1, keepdims=True)  # m_i
    if overwrite_input:
        s -= row_max
        shifted = s
    else:
        shifted = s - row_max
    p = xp.exp(shifted)  # exp(s_ij - m_i) <= 1: a new array
    del shifted
    p *= 1.0 / xp.sum(p, axis=-1, keepdims=True)  # in place: p is ours; (B, N, 1) reciprocals
    return p, SoftmaxCache(weights=p)


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
