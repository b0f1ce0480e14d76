r"""Dot product: :math:`f(x_i, x_j) = \alpha\,\theta_i^\top\phi_j`, normalised by N′.

Shapes: θ (B, C′, N), φ (B, C′, N′), attention A (B, N, N′). N′ is the number of key
positions *after* pooling, as in every public implementation.

Forward
-------
.. math::

    A_{ij} = \frac{\alpha\,\theta_i^\top\phi_j}{N'}

Backward
--------
A is linear in θ and in φ:

.. math::

    \bar\theta = \frac{\alpha}{N'}\,\phi\,\bar A^\top,\qquad
    \bar\phi = \frac{\alpha}{N'}\,\theta\,\bar A.
"""

from __future__ import annotations

from collections.abc import Mapping

from .._backend import Array
from ..layers import bilinear
from . import Pairwise, PairwiseGrads, register

__all__ = ["backward", "forward"]


def forward(
    theta: Array, phi: Array, extra: Mapping[str, Array], scale: float
) -> tuple[Array, bilinear.BilinearCache]:
    """A = scale · θᵢᵀφⱼ / N′, of shape (B, N, N′)."""
    n_keys = phi.shape[-1]
    return bilinear.forward(theta, phi, scale / n_keys)  # the 1/N' folds into the scale


def backward(dattention: Array, cache: bilinear.BilinearCache) -> PairwiseGrads:
    """Gradients of θ and φ from the gradient of the attention."""
    dtheta, dphi = bilinear.backward(dattention, cache)
    return PairwiseGrads(dtheta=dtheta, dphi=dphi)


VARIANT = register(
    Pairwise(
        name="dot_product",
        formula="f = α θᵢᵀφⱼ, C(x) = N′",
        order=2,
        embeds=True,
        uses_scale=True,
        forward=forward,
        backward=backward,
        has_logits=True,
        pair_flops=lambda channels: 2 * channels,  # θ_iᵀφ_j
    )
)
