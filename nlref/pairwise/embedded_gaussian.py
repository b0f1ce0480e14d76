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
from . import Logits, Pairwise, PairwiseGrads, register

__all__ = ["EmbeddedGaussianCache", "backward", "forward", "logits_backward", "logits_forward"]


@dataclass(frozen=True)
class EmbeddedGaussianCache:
    """The caches of the two steps: the logits, then the softmax."""

    logits: bilinear.BilinearCache
    softmax: softmax.SoftmaxCache


def logits_forward(
    theta: Array, phi: Array, extra: Mapping[str, Array], scale: float
) -> tuple[Array, bilinear.BilinearCache]:
    """The logits s = scale · θᵢᵀφⱼ, of shape (B, N, N′)."""
    return bilinear.forward(theta, phi, scale)


def logits_backward(ds: Array, cache: bilinear.BilinearCache) -> PairwiseGrads:
    """Gradients of θ and φ from the gradient of the logits."""
    dtheta, dphi = bilinear.backward(ds, cache)
    return PairwiseGrads(dtheta=dtheta, dphi=dphi)


def forward(
    theta: Array, phi: Array, extra: Mapping[str, Array], scale: float
) -> tuple[Array, EmbeddedGaussianCache]:
    """A = softmax_j(scale · θᵢᵀφⱼ), of shape (B, N, N′)."""
    s, logits_cache = logits_forward(theta, phi, extra, scale)
    attention, softmax_cache = softmax.forward(s)
    return attention, EmbeddedGaussianCache(logits=logits_cache, softmax=softmax_cache)


def backward(dattention: Array, cache: EmbeddedGaussianCache) -> PairwiseGrads:
    """Gradients of θ and φ from the gradient of the attention."""
    ds = softmax.backward(dattention, cache.softmax)  # forward was: A = softmax(s)
    return logits_backward(ds, cache.logits)  # forward was: s = scale θᵀφ


VARIANT = register(
    Pairwise(
        name="embedded_gaussian",
        formula="f = exp(α θᵢᵀφⱼ), C(x) = Σⱼ f  (softmax)",
        order=1,
        embeds=True,
        uses_scale=True,
        forward=forward,
        backward=backward,
        has_logits=True,
        pair_flops=lambda channels: 2 * channels,  # s_ij = θ_iᵀφ_j
        softmax=True,
        logits=Logits(forward=logits_forward, backward=logits_backward),
    )
)
