r"""Concatenation: :math:`f(x_i, x_j) = \mathrm{ReLU}(w_f^\top[\theta_i;\phi_j])`, normalised by N′.

Shapes: θ (B, C′, N), φ (B, C′, N′), ``concat.weight`` w_f (2C′,) whose first C′ entries
w_θ multiply θ and last C′ entries w_φ multiply φ; attention A (B, N, N′).

Forward, without materialising B×2C′×N×N′
------------------------------------------
The projection of a concatenation splits into two projections:

.. math::

    w_f^\top[\theta_i;\phi_j] = \underbrace{w_\theta^\top\theta_i}_{a_i}
                               + \underbrace{w_\phi^\top\phi_j}_{b_j},\qquad
    A_{ij} = \frac{\mathrm{ReLU}(a_i + b_j)}{N'}.

a (B, N) and b (B, N′) cost O(B·C′·(N + N′)); every other array (the pre-activation
a_i + b_j, its ReLU mask, the attention) is B×N×N′, so memory is O(B·N·N′) instead of
the O(B·2C′·N·N′) of AlexHex7 and mmcv, which build the concatenated tensor explicitly.

Backward
--------
With the ReLU mask :math:`m_{ij} = [a_i + b_j > 0]` and
:math:`\bar p_{ij} = m_{ij}\,\bar A_{ij}/N'`:

.. math::

    \bar a_i = \sum_j \bar p_{ij},\qquad \bar b_j = \sum_i \bar p_{ij},

.. math::

    \bar\theta_{c,i} = w_{\theta,c}\,\bar a_i,\qquad
    \bar\phi_{c,j} = w_{\phi,c}\,\bar b_j,\qquad
    \bar w_{\theta,c} = \sum_{b,i} \theta_{b,c,i}\,\bar a_{b,i},\qquad
    \bar w_{\phi,c} = \sum_{b,j} \phi_{b,c,j}\,\bar b_{b,j}.

ReLU is not differentiable at 0; like PyTorch we use the subgradient 0 there.

Implementation: since N′ > 0, ReLU(u)/N′ = ReLU(u/N′), so the 1/N′ is applied to a and b
(O(N + N′)) rather than to the (B, N, N′) array, and the ReLU mask is read off A itself
(A > 0 exactly where a_i + b_j > 0), so the cache holds no mask: only two (B, N, N′)
arrays are made in the forward, and two in the backward.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .._backend import Array, namespace
from . import Pairwise, PairwiseGrads, register

__all__ = ["ConcatenationCache", "backward", "forward"]

WEIGHT = "concat.weight"


@dataclass(frozen=True)
class ConcatenationCache:
    """What :func:`backward` needs from :func:`forward`."""

    theta: Array  # (B, C', N)
    phi: Array  # (B, C', N')
    weight: Array  # (2C',)
    attention: Array  # (B, N, N'), ReLU(a_i + b_j) / N': positive exactly where a_i + b_j > 0


def forward(
    theta: Array, phi: Array, extra: Mapping[str, Array], scale: float
) -> tuple[Array, ConcatenationCache]:
    """A = ReLU(w_θᵀθᵢ + w_φᵀφⱼ) / N′, of shape (B, N, N′). ``scale`` must be 1."""
    xp = namespace(theta, phi)
    w = extra[WEIGHT]
    c_inter = theta.shape[1]
    w_theta, w_phi = w[:c_inter], w[c_inter:]
    n_keys = phi.shape[-1]
    a = xp.matmul(w_theta, theta) / n_keys  # (C',) @ (B, C', N) -> (B, N), over N'
    b = xp.matmul(w_phi, phi) / n_keys  # (C',) @ (B, C', N') -> (B, N'), over N'
    pre = a[:, :, None] + b[:, None, :]  # (B, N, N'): no C' axis anywhere
    attention = xp.maximum(pre, 0.0)  # ReLU; NaN propagates, as in PyTorch's ReLU
    return attention, ConcatenationCache(theta=theta, phi=phi, weight=w, attention=attention)


def backward(dattention: Array, cache: ConcatenationCache) -> PairwiseGrads:
    """Gradients of θ, φ and ``concat.weight`` from the gradient of the attention."""
    xp = namespace(dattention)
    n_keys = cache.phi.shape[-1]
    c_inter = cache.theta.shape[1]
    # forward was: A = relu(a_i + b_j) / N'; the mask is A > 0 (or NaN, which PyTorch's
    # ReLU backward also lets through)
    dpre = xp.where(cache.attention <= 0, 0.0, dattention)  # m_ij dA_ij
    da = xp.sum(dpre, axis=2) / n_keys  # (B, N)
    db = xp.sum(dpre, axis=1) / n_keys  # (B, N')
    # forward was: a = w_theta^T theta, b = w_phi^T phi
    w_theta, w_phi = cache.weight[:c_inter], cache.weight[c_inter:]
    dtheta = w_theta[None, :, None] * da[:, None, :]  # (B, C', N)
    dphi = w_phi[None, :, None] * db[:, None, :]  # (B, C', N')
    dw_theta = xp.sum(xp.matmul(cache.theta, da[:, :, None]), axis=(0, 2))  # (C',)
    dw_phi = xp.sum(xp.matmul(cache.phi, db[:, :, None]), axis=(0, 2))  # (C',)
    return PairwiseGrads(dtheta=dtheta, dphi=dphi, dextra={WEIGHT: xp.concat([dw_theta, dw_phi])})


VARIANT = register(
    Pairwise(
        name="concatenation",
        formula="f = ReLU(w_fᵀ[θᵢ; φⱼ]), C(x) = N′",
        order=3,
        embeds=True,
        uses_scale=False,
        forward=forward,
        backward=backward,
        has_logits=False,  # w_θᵀθ_i + w_φᵀφ_j: O(N + N′) products, then (B, N, N′) adds
        pair_flops=lambda channels: 0,
        extra_params=lambda inter_channels: {WEIGHT: (2 * inter_channels,)},
    )
)
