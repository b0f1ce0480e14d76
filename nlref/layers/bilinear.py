r"""Scaled pairwise dot products between queries and keys: the logits of the block.

Shapes: θ of shape (B, C′, N) (queries), φ of shape (B, C′, N′) (keys), output s of shape
(B, N, N′). For the Gaussian variant θ = x and φ = pool(x), with C channels instead of C′.

Forward
-------
.. math::

    s_{b,i,j} = \alpha \sum_c \theta_{b,c,i}\, \phi_{b,c,j}
    \qquad(s_b = \alpha\, \theta_b^\top \phi_b)

Backward
--------
.. math::

    \bar\theta_b = \alpha\, \phi_b\, \bar s_b^\top \quad (C′, N),\qquad
    \bar\phi_b = \alpha\, \theta_b\, \bar s_b \quad (C′, N′)

The factor α multiplies the (C′, N) or (C′, N′) operand, never the (N, N′) product: the
same numbers up to rounding, for a fraction of the work.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._backend import Array, namespace

__all__ = ["BilinearCache", "backward", "forward"]


@dataclass(frozen=True)
class BilinearCache:
    """What :func:`backward` needs from :func:`forward`."""

    theta: Array  # (B, C', N)
    phi: Array  # (B, C', N')
    scale: float


def forward(theta: Array, phi: Array, scale: float = 1.0) -> tuple[Array, BilinearCache]:
    """Return ``s = scale * θᵀ φ`` of shape (B, N, N′) and the cache."""
    xp = namespace(theta, phi)
    scaled_theta = theta if scale == 1.0 else scale * theta  # (B, C', N): cheaper than s
    s = xp.matmul(xp.matrix_transpose(scaled_theta), phi)  # (B, N, C') @ (B, C', N')
    return s, BilinearCache(theta=theta, phi=phi, scale=scale)


def backward(ds: Array, cache: BilinearCache) -> tuple[Array, Array]:
    """Return ``(dθ, dφ)`` for the upstream gradient ``ds`` of shape (B, N, N′)."""
    xp = namespace(ds)
    # forward was: s = scale * theta^T phi
    alpha = cache.scale
    phi = cache.phi if alpha == 1.0 else alpha * cache.phi
    theta = cache.theta if alpha == 1.0 else alpha * cache.theta
    # dtheta = phi ds^T, computed as dtheta^T = ds phi^T (ds in its row-major layout)
    dtheta = xp.matrix_transpose(xp.matmul(ds, xp.matrix_transpose(phi)))  # (B, C', N)
    # dphi = theta ds, computed as dphi^T = ds^T theta^T (faster for BLAS)
    dphi = xp.matrix_transpose(xp.matmul(xp.matrix_transpose(ds), xp.matrix_transpose(theta)))
    return dtheta, dphi
