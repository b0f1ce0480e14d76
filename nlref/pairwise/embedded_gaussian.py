r"""Embedded Gaussian: :math:`f(x_i, x_j) = \exp(\alpha\,\theta_i^\top\phi_j)`, softmax over j.

Shapes: θ (B, C′, N), φ (B, C′, N′), attention A (B, N, N′); α is ``cfg.scale`` (1 in the
paper, 1/√C′ in Caffe2 / mmcv / pytorchvideo, 1/√C in timm).

Forward
-------
.. math::

    s_{ij} = \alpha\,\theta_i^\top \phi_j,\qquad
    A_{ij} = \frac{\exp s_{ij}}{\sum_k \exp s_{ik}} = \operatorname{softmax}_j(s_i)

so C(x) = Σⱼ f(xᵢ, xⱼ) and every row of A sums to 1. This is exactly
``scaled_dot_product_attention`` with queries θᵀ, keys φᵀ, values gᵀ and ``scale=α`` passed
explicitly (its default is 1/√C′, not the paper's 1).

Backward
--------
Chain the softmax backward (:mod:`nlref.layers.softmax`) and the bilinear backward
(:mod:`nlref.layers.bilinear`):

.. math::

    \bar s_{ik} = A_{ik}\Big(\bar A_{ik} - \sum_j \bar A_{ij} A_{ij}\Big),\qquad
    \bar\theta = \alpha\,\phi\,\bar s^\top,\qquad
    \bar\phi = \alpha\,\theta\,\bar s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .._backend import Array
from ..layers import bilinear, softmax
from . import Pairwise, PairwiseGrads, register

__all__ = ["SoftmaxAttentionCache", "backward", "forward"]


@dataclass(frozen=True)
class SoftmaxAttentionCache:
    """Caches of the two steps: logits, then softmax."""

    logits: bilinear.BilinearCache
    softmax: softmax.SoftmaxCache

    @property
    def rows(self) -> softmax.RowStats:
        """Each row's max and reciprocal sum: pass them back to :func:`forward` to
        recompute the same attention without the row reductions."""
        return self.softmax.rows


def forward(
    theta: Array,
    phi: Array,
    extra: Mapping[str, Array],
    scale: float,
    *,
    rows: softmax.RowStats | None = None,
) -> tuple[Array, SoftmaxAttentionCache]:
    """A = softmax_j(scale · θᵢᵀφⱼ), of shape (B, N, N′).

    ``rows``: the row statistics of an earlier forward on the same θ and φ
    (``cache.rows``); the same attention is then recomputed without the row reductions.
    """
    s, logits_cache = bilinear.forward(theta, phi, scale)
    # s is a new array made here: the softmax may shift it in place
    attention, softmax_cache = softmax.forward(s, overwrite_input=True, rows=rows)
    return attention, SoftmaxAttentionCache(logits=logits_cache, softmax=softmax_cache)


def backward(
    dattention: Array,
    cache: SoftmaxAttentionCache,
    *,
    overwrite_input: bool = False,
) -> PairwiseGrads:
    """Gradients of θ and φ from the gradient of the attention.

    ``overwrite_input=True`` lets the softmax backward work in ``dattention``'s memory.
    """
    ds = softmax.backward(dattention, cache.softmax, overwrite_input=overwrite_input)
    dtheta, dphi = bilinear.backward(ds, cache.logits)
    return PairwiseGrads(dtheta=dtheta, dphi=dphi)


VARIANT = register(
    Pairwise(
        name="embedded_gaussian",
        formula="f = exp(α θᵢᵀφⱼ), C(x) = Σⱼ f  (softmax)",
        order=1,
        embeds=True,
        uses_scale=True,
        softmax=True,
        forward=forward,
        backward=backward,
    )
)
