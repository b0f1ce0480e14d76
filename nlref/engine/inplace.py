r"""In-place versions of the softmax steps, for NumPy and CuPy arrays the engine made itself.

The softmax is the one step of the block whose temporaries are (B, N, N′): its forward
would allocate the shifted logits, their exponentials and the weights, its backward the
difference and the product. Here the engine hands over an array it made itself (the
logits of a tile, or the gradient of a tile's attention) and the same operations, in the
same order, run in its memory:

- :func:`softmax_forward` is :func:`nlref.layers.softmax.forward` (s − m, exp, times the
  reciprocal row sum), in ``s``'s memory, and it returns the row statistics (mᵢ and
  rᵢ = 1 / Σₖ exp(sᵢₖ − mᵢ), two O(N) arrays) from which :func:`softmax_forward` recomputes
  the same weights without the two row reductions: Pᵢⱼ = exp(sᵢⱼ − mᵢ) rᵢ, the forward's
  operations minus its reductions, hence its bits;
- :func:`softmax_backward` is :func:`nlref.layers.softmax.backward`, (P̄ − Σⱼ P̄ᵢⱼPᵢⱼ) ⊙ P,
  in ``dp``'s memory.

Other arrays (array-api-strict, PyTorch, JAX) get the same formulas out of place.
``tests/test_engine.py`` pins both functions to the layer bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import array_api_compat

from .._backend import Array, namespace

__all__ = ["RowStats", "owns_memory", "softmax_backward", "softmax_forward"]


@dataclass(frozen=True)
class RowStats:
    """Each row's max mᵢ and reciprocal sum rᵢ = 1 / Σₖ exp(sᵢₖ − mᵢ), (B, N, 1) each."""

    max: Array
    inv_sum: Array


def owns_memory(a: Array) -> bool:
    """Whether the engine may work in ``a``'s memory: NumPy and CuPy arrays only."""
    return array_api_compat.is_numpy_array(a) or array_api_compat.is_cupy_array(a)


def _module(a: Array) -> Any:
    """numpy or cupy itself (their ``exp`` takes ``out=``)."""
    if array_api_compat.is_cupy_array(a):
        import cupy

        return cupy
    import numpy

    return numpy


def softmax_forward(s: Array, stats: RowStats | None = None) -> tuple[Array, RowStats]:
    """Softmax of the logits ``s`` (B, N, N′) over the last axis, computed in ``s``'s
    memory (which the caller hands over), and its row statistics. Given the ``stats`` of an
    earlier call on the same logits, the row reductions are skipped: same bits."""
    xp = namespace(s)
    row_max = xp.max(s, axis=-1, keepdims=True) if stats is None else stats.max
    if owns_memory(s):
        s -= row_max
        e = _module(s).exp(s, out=s)
    else:
        e = xp.exp(s - row_max)
    if stats is None:
        stats = RowStats(max=row_max, inv_sum=1.0 / xp.sum(e, axis=-1, keepdims=True))
    if owns_memory(e):
        e *= stats.inv_sum
        return e, stats
    return e * stats.inv_sum, stats


def softmax_backward(dp: Array, p: Array) -> Array:
    """Gradient of the logits from the gradient ``dp`` of the weights ``p``, computed in
    ``dp``'s memory (which the caller hands over)."""
    xp = namespace(dp)
    row_dot = xp.vecdot(dp, p, axis=-1)[..., None]  # sum_j dP_ij P_ij, (B, N, 1)
    if owns_memory(dp):
        dp -= row_dot
        dp *= p
        return dp
    return (dp - row_dot) * p
