r"""1×1 projection (a 1×1(×1) convolution) on flattened positions.

Shapes: input x of shape (B, C_in, N), weight W of shape (C_out, C_in), optional bias b of
shape (C_out,), output of shape (B, C_out, N).

Forward
-------
.. math::

    u_{b,o,n} = \sum_c W_{o,c}\, x_{b,c,n} + b_o

Backward
--------
Given :math:`\bar u = \partial L / \partial u` (B, C_out, N):

.. math::

    \bar x_{b,c,n} = \sum_o W_{o,c}\, \bar u_{b,o,n}
        \quad(\bar x = W^\top \bar u),\qquad
    \bar W_{o,c} = \sum_{b,n} \bar u_{b,o,n}\, x_{b,c,n}
        \quad(\bar W = \textstyle\sum_b \bar u_b x_b^\top),\qquad
    \bar b_o = \sum_{b,n} \bar u_{b,o,n}.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._backend import Array, namespace

__all__ = ["ProjectionCache", "ProjectionGrads", "backward", "forward"]


@dataclass(frozen=True)
class ProjectionCache:
    """What :func:`backward` needs from :func:`forward`."""

    x: Array  # (B, C_in, N), the input
    weight: Array  # (C_out, C_in)
    has_bias: bool


@dataclass(frozen=True)
class ProjectionGrads:
    """Gradients of a projection: ``dx`` (B, C_in, N), ``dweight``, and ``dbias`` or None."""

    dx: Array
    dweight: Array
    dbias: Array | None


def forward(x: Array, weight: Array, bias: Array | None = None) -> tuple[Array, ProjectionCache]:
    """Compute ``W x + b`` for x of shape (B, C_in, N); returns (B, C_out, N) and the cache."""
    xp = namespace(x, weight)
    u = xp.matmul(weight, x)  # (C_out, C_in) @ (B, C_in, N) -> (B, C_out, N)
    if bias is not None:
        u = u + bias[:, None]
    return u, ProjectionCache(x=x, weight=weight, has_bias=bias is not None)


def backward(du: Array, cache: ProjectionCache) -> ProjectionGrads:
    """Backward of :func:`forward` for the upstream gradient ``du`` of shape (B, C_out, N)."""
    xp = namespace(du)
    # forward was: u = W x + b
    dx = xp.matmul(xp.matrix_transpose(cache.weight), du)  # (C_in, C_out) @ (B, C_out, N)
    dweight = xp.sum(xp.matmul(du, xp.matrix_transpose(cache.x)), axis=0)  # sum_b du_b x_b^T
    dbias = xp.sum(du, axis=(0, 2)) if cache.has_bias else None
    return ProjectionGrads(dx=dx, dweight=dweight, dbias=dbias)
