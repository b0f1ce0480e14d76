r"""A fully connected layer on feature vectors: :math:`o = h W^\top + b`.

Shapes: input h of shape (B, C_in), weight W of shape (C_out, C_in) (PyTorch's
``nn.Linear`` layout), optional bias b of shape (C_out,), output o of shape (B, C_out).

Forward
-------
.. math::

    o_{b,k} = \sum_c W_{k,c}\, h_{b,c} + b_k.

Backward
--------
.. math::

    \bar h = \bar o\, W \quad (B, C_{in}),\qquad
    \bar W = \bar o^\top h \quad (C_{out}, C_{in}),\qquad
    \bar b_k = \sum_b \bar o_{b,k}.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..._backend import Array, namespace

__all__ = ["LinearCache", "LinearGrads", "backward", "forward"]


@dataclass(frozen=True)
class LinearCache:
    """What :func:`backward` needs from :func:`forward`."""

    h: Array  # (B, C_in)
    weight: Array  # (C_out, C_in)
    has_bias: bool


@dataclass(frozen=True)
class LinearGrads:
    """Gradients of a linear layer: ``dh`` (B, C_in), ``dweight``, and ``dbias`` or None."""

    dh: Array
    dweight: Array
    dbias: Array | None


def forward(h: Array, weight: Array, bias: Array | None = None) -> tuple[Array, LinearCache]:
    """Compute ``h Wᵀ + b`` for h of shape (B, C_in); returns (B, C_out) and the cache."""
    if len(h.shape) != 2 or len(weight.shape) != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(
            "expected h of shape (B, C_in) and weight of shape (C_out, C_in) with the same "
            f"C_in, got h {tuple(h.shape)} and weight {tuple(weight.shape)}"
        )
    xp = namespace(h, weight)
    o = xp.matmul(h, xp.matrix_transpose(weight))  # (B, C_in) @ (C_in, C_out)
    if bias is not None:
        o = o + bias[None, :]
    return o, LinearCache(h=h, weight=weight, has_bias=bias is not None)


def backward(dout: Array, cache: LinearCache) -> LinearGrads:
    """Backward of :func:`forward` for the upstream gradient ``dout`` of shape (B, C_out)."""
    xp = namespace(dout)
    # forward was: o = h W^T + b
    dh = xp.matmul(dout, cache.weight)  # (B, C_out) @ (C_out, C_in)
    dweight = xp.matmul(xp.matrix_transpose(dout), cache.h)  # (C_out, B) @ (B, C_in)
    dbias = xp.sum(dout, axis=0) if cache.has_bias else None
    return LinearGrads(dh=dh, dweight=dweight, dbias=dbias)
