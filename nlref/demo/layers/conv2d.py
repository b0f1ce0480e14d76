r"""A 2D convolution with a k×k kernel, stride 1 and zero padding that keeps the size.

This is the *local* layer of the toy long-range task (:mod:`nlref.demo.toy`): each output
position sees only a k×k window of the input, the opposite of the Non-local block.

Shapes: input x of shape (B, C_in, H, W), weight W of shape (C_out, C_in, k, k) with k odd,
optional bias b of shape (C_out,), output u of shape (B, C_out, H, W). The padding is
p = (k − 1)/2 zeros on every side, so ``torch.nn.Conv2d(C_in, C_out, k, padding=p)``
computes the same thing (PyTorch's "convolution" is a cross-correlation, and so is this).

Forward
-------
With :math:`\tilde x` the zero-padded input, of shape (B, C_in, H + 2p, W + 2p):

.. math::

    u_{b,o,i,j} = \sum_{c}\sum_{r=0}^{k-1}\sum_{s=0}^{k-1}
                  W_{o,c,r,s}\,\tilde x_{b,c,i+r,j+s} + b_o .

Implementation ("im2col"): stack the k² shifted views
:math:`X^{(r,s)}_{b,c,i,j} = \tilde x_{b,c,i+r,j+s}` into columns of shape
(B, C_in·k², H·W); then u = W_flat · columns, with W_flat of shape (C_out, C_in·k²) in
the same (c, r, s) order. That is one matrix product, like :mod:`~nlref.layers.projection`.

Backward
--------
u is linear in W, in b and in :math:`\tilde x`, so each gradient collects the terms that
multiply it:

.. math::

    \bar W_{o,c,r,s} = \sum_{b,i,j} \bar u_{b,o,i,j}\,\tilde x_{b,c,i+r,j+s}
        \quad(\bar W_\text{flat} = \textstyle\sum_b \bar u_b\,\text{columns}_b^\top),
    \qquad
    \bar b_o = \sum_{b,i,j} \bar u_{b,o,i,j},

.. math::

    \bar{\tilde x}_{b,c,m,n} = \sum_{r,s}\sum_o W_{o,c,r,s}\,\bar u_{b,o,m-r,n-s}
    \quad(\text{each shifted view sends } W^{(r,s)\top}\bar u \text{ back to where it was read}),

and :math:`\bar x` is :math:`\bar{\tilde x}` with the padding cropped off (the padding is a
constant, so the gradient that reaches it is dropped).
"""

from __future__ import annotations

from dataclasses import dataclass

import array_api_compat

from ..._backend import Array, namespace

__all__ = ["Conv2dCache", "Conv2dGrads", "backward", "forward"]


@dataclass(frozen=True)
class Conv2dCache:
    """What :func:`backward` needs from :func:`forward`."""

    columns: Array  # (B, C_in*k*k, H*W), the im2col matrix of the padded input
    weight: Array  # (C_out, C_in, k, k)
    input_shape: tuple[int, ...]  # (B, C_in, H, W)
    has_bias: bool


@dataclass(frozen=True)
class Conv2dGrads:
    """Gradients of a convolution: ``dx`` (B, C_in, H, W), ``dweight``, ``dbias`` or None."""

    dx: Array
    dweight: Array
    dbias: Array | None


def _check(x: Array, weight: Array, bias: Array | None) -> None:
    if len(x.shape) != 4:
        raise ValueError(f"expected x of shape (B, C_in, H, W), got shape {tuple(x.shape)}")
    if len(weight.shape) != 4 or weight.shape[2] != weight.shape[3] or weight.shape[2] % 2 != 1:
        raise ValueError(
            "expected weight of shape (C_out, C_in, k, k) with k odd, "
            f"got shape {tuple(weight.shape)}"
        )
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"weight has C_in={weight.shape[1]} input channels but x has C_in={x.shape[1]} "
            f"(x {tuple(x.shape)}, weight {tuple(weight.shape)})"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"expected bias of shape (C_out,) = ({weight.shape[0]},), got {tuple(bias.shape)}"
        )


def _pad(x: Array, p: int) -> Array:
    """Zero-pad the last two axes of (B, C, H, W) by p on each side (the standard has no pad)."""
    if p == 0:
        return x
    xp = namespace(x)
    b, c, h, w = x.shape
    rows = xp.zeros((b, c, p, w), dtype=x.dtype, device=array_api_compat.device(x))
    x = xp.concat([rows, x, rows], axis=2)
    cols = xp.zeros((b, c, h + 2 * p, p), dtype=x.dtype, device=array_api_compat.device(x))
    return xp.concat([cols, x, cols], axis=3)


def forward(x: Array, weight: Array, bias: Array | None = None) -> tuple[Array, Conv2dCache]:
    """Convolve x (B, C_in, H, W) with weight (C_out, C_in, k, k); returns (B, C_out, H, W).

    Raises
    ------
    ValueError
        If the shapes do not fit (k must be odd: the padding (k − 1)/2 keeps H and W).
    """
    _check(x, weight, bias)
    xp = namespace(x, weight)
    b, c_in, h, w = x.shape
    c_out, _, k, _ = weight.shape
    padded = _pad(x, (k - 1) // 2)
    # columns[b, (c, r, s), (i, j)] = padded[b, c, i + r, j + s]
    views = [padded[:, :, r : r + h, s : s + w] for r in range(k) for s in range(k)]
    stacked = xp.stack(views, axis=2)  # (B, C_in, k*k, H, W), (r, s) in C order
    columns = xp.reshape(stacked, (b, c_in * k * k, h * w))
    w_flat = xp.reshape(weight, (c_out, c_in * k * k))
    u = xp.matmul(w_flat, columns)  # (C_out, C_in k²) @ (B, C_in k², HW) -> (B, C_out, HW)
    if bias is not None:
        u = u + bias[:, None]
    cache = Conv2dCache(
        columns=columns, weight=weight, input_shape=tuple(x.shape), has_bias=bias is not None
    )
    return xp.reshape(u, (b, c_out, h, w)), cache


def backward(du: Array, cache: Conv2dCache) -> Conv2dGrads:
    """Backward of :func:`forward` for the upstream gradient ``du`` of shape (B, C_out, H, W)."""
    xp = namespace(du)
    b, c_in, h, w = cache.input_shape
    c_out, _, k, _ = cache.weight.shape
    p = (k - 1) // 2
    du_flat = xp.reshape(du, (b, c_out, h * w))
    # forward was: u = W_flat @ columns + b
    dw_flat = xp.sum(xp.matmul(du_flat, xp.matrix_transpose(cache.columns)), axis=0)
    dweight = xp.reshape(dw_flat, tuple(cache.weight.shape))
    dbias = xp.sum(du_flat, axis=(0, 2)) if cache.has_bias else None
    w_flat = xp.reshape(cache.weight, (c_out, c_in * k * k))
    dcolumns = xp.matmul(xp.matrix_transpose(w_flat), du_flat)  # (B, C_in k², HW)
    dviews = xp.reshape(dcolumns, (b, c_in, k * k, h, w))
    # forward was: view (r, s) = padded[:, :, r:r+H, s:s+W]; put each gradient back there
    hp, wp = h + 2 * p, w + 2 * p
    dpadded = xp.zeros((b, c_in, hp, wp), dtype=du.dtype, device=array_api_compat.device(du))
    for r in range(k):
        for s in range(k):
            dpadded = dpadded + _embed(dviews[:, :, r * k + s, :, :], r, s, hp, wp)
    dx = dpadded[:, :, p : p + h, p : p + w]  # the padding's gradient is dropped
    return Conv2dGrads(dx=dx, dweight=dweight, dbias=dbias)


def _embed(v: Array, top: int, left: int, height: int, width: int) -> Array:
    """Place v (B, C, h, w) at (top, left) inside zeros of shape (B, C, height, width)."""
    xp = namespace(v)
    dev = array_api_compat.device(v)
    b, c, h, w = v.shape
    bottom, right = height - top - h, width - left - w
    rows = [xp.zeros((b, c, n, w), dtype=v.dtype, device=dev) for n in (top, bottom)]
    v = xp.concat([rows[0], v, rows[1]], axis=2)  # (B, C, height, w)
    cols = [xp.zeros((b, c, height, n), dtype=v.dtype, device=dev) for n in (left, right)]
    return xp.concat([cols[0], v, cols[1]], axis=3)  # (B, C, height, width)
