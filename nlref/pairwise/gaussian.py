r"""Gaussian: :math:`f(x_i, x_j) = \exp(\alpha\,x_i^\top x_j)`, softmax over j.

Shapes: θ = x (B, C, N), φ = pool(x) (B, C, N′) (or x when not subsampled), attention A
(B, N, N′). There are no θ/φ parameters: the pairwise term compares the raw inputs, with
C channels rather than C′.

Forward and backward
--------------------
The formula is the embedded Gaussian's with the embeddings replaced by identities, so this
module reuses its forward and backward unchanged:

.. math::

    A_{ij} = \operatorname{softmax}_j(\alpha\, x_i^\top x_j),\qquad
    \bar s_{ik} = A_{ik}\Big(\bar A_{ik} - \sum_j \bar A_{ij} A_{ij}\Big),

.. math::

    \bar\theta = \alpha\,\phi\,\bar s^\top \;\to\; \bar x \text{ directly},\qquad
    \bar\phi = \alpha\,\theta\,\bar s \;\to\; \text{through the max-pool to } \bar x.

The block adds both to x's gradient (x reaches the attention along two paths).
"""

from __future__ import annotations

from . import Logits, Pairwise, register
from .embedded_gaussian import backward, forward, logits_backward, logits_forward

VARIANT = register(
    Pairwise(
        name="gaussian",
        formula="f = exp(α xᵢᵀxⱼ), C(x) = Σⱼ f  (softmax on raw x)",
        order=0,
        embeds=False,
        uses_scale=True,
        forward=forward,
        backward=backward,
        has_logits=True,
        pair_flops=lambda channels: 2 * channels,  # s_ij = x_iᵀx_j over C channels
        softmax=True,
        logits=Logits(forward=logits_forward, backward=logits_backward),
    )
)
