r"""Max-pool subsampling with kernel = stride, floor on odd sizes (as PyTorch does).

Shapes: input x of shape (B, C, S_1, …, S_d) with d = 1, 2 or 3, kernel (k_1, …, k_d),
output of shape (B, C, ⌊S_1/k_1⌋, …, ⌊S_d/k_d⌋). Trailing rows that do not fill a window
are dropped, exactly like ``torch.nn.MaxPool{1,2,3}d(k, stride=k)``.

Forward
-------
Each output position :math:`o` owns a window :math:`W(o)` of :math:`K = \prod_d k_d` input
positions, and

.. math::

    y_{b,c,o} = \max_{p \in W(o)} x_{b,c,p},\qquad
    a_{b,c,o} = \operatorname*{arg\,max}_{p \in W(o)} x_{b,c,p}

(the first maximum on ties, as PyTorch's CPU and CUDA kernels do).

Backward
--------
Max is piecewise linear: its derivative is 1 at the arg max and 0 elsewhere, so

.. math::

    \bar x_{b,c,p} = \sum_o \bar y_{b,c,o}\, [p = a_{b,c,o}]

Windows do not overlap (stride = kernel), so each input position receives at most one
term, and dropped (floored) positions receive 0. At ties the true function is not
differentiable; this subgradient matches PyTorch's.

Implementation: crop, reshape to (B, C, o_1, k_1, …, o_d, k_d), move the kernel axes last
and flatten them to one axis of length K; max / argmax over that axis. The backward
scatters through a one-hot mask and undoes the same reshapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import array_api_compat

from .._backend import Array, namespace

__all__ = [
    "MaxPoolCache",
    "backward",
    "backward_flat",
    "forward",
    "forward_flat",
    "output_size",
    "windows",
]


@dataclass(frozen=True)
class MaxPoolCache:
    """What :func:`backward` needs from :func:`forward`."""

    input_shape: tuple[int, ...]  # (B, C, *S)
    kernel: tuple[int, ...]  # (k_1, ..., k_d)
    argmax: Array  # (B, C, *S_out), index into each flattened window of K = prod(kernel)


def output_size(spatial: tuple[int, ...], kernel: tuple[int, ...]) -> tuple[int, ...]:
    """Spatial size after pooling: ``floor(S_d / k_d)`` per dim."""
    return tuple(s // k for s, k in zip(spatial, kernel, strict=True))


def _window_perm(d: int) -> tuple[int, ...]:
    # (B, C, o_1, k_1, ..., o_d, k_d) -> (B, C, o_1, ..., o_d, k_1, ..., k_d)
    return (0, 1, *(2 + 2 * i for i in range(d)), *(3 + 2 * i for i in range(d)))


def windows(x: Array, kernel: tuple[int, ...]) -> Array:
    """The pooling windows of ``x`` (B, C, *S) as an array (B, C, *S_out, K), K = prod(kernel)."""
    xp = namespace(x)
    b, c, *spatial = x.shape
    d = len(spatial)
    out_sp = output_size(tuple(spatial), kernel)
    crop = x[
        (slice(None), slice(None), *(slice(0, o * k) for o, k in zip(out_sp, kernel, strict=True)))
    ]
    interleaved = [
        n for ok in zip(out_sp, kernel, strict=True) for n in ok
    ]  # o_1, k_1, ..., o_d, k_d
    win = xp.permute_dims(xp.reshape(crop, (b, c, *interleaved)), _window_perm(d))
    return xp.reshape(win, (b, c, *out_sp, math.prod(kernel)))


def forward(x: Array, kernel: tuple[int, ...]) -> tuple[Array, MaxPoolCache]:
    """Max-pool ``x`` (B, C, *S) with kernel = stride = ``kernel``; returns (out, cache)."""
    xp = namespace(x)
    win = windows(x, kernel)  # (B, C, *S_out, K)
    out = xp.max(win, axis=-1)
    argmax = xp.argmax(win, axis=-1)
    return out, MaxPoolCache(input_shape=tuple(x.shape), kernel=tuple(kernel), argmax=argmax)


def backward(dout: Array, cache: MaxPoolCache) -> Array:
    """Route ``dout`` (B, C, *S_out) back to the arg max of each window; zeros elsewhere."""
    xp = namespace(dout)
    b, c, *spatial = cache.input_shape
    d = len(spatial)
    kernel = cache.kernel
    out_sp = output_size(tuple(spatial), kernel)
    k_total = math.prod(kernel)
    # forward was: out = max over the last axis of windows (B, C, *S_out, K)
    slots = xp.arange(k_total, device=array_api_compat.device(dout))
    hit = slots == cache.argmax[..., None]  # one-hot mask (B, C, *S_out, K)
    # a select, not hit * dout: 0 * inf = NaN would leak an inf or NaN gradient into the
    # window's other positions, which PyTorch leaves at 0
    dwindows = xp.where(hit, dout[..., None], xp.zeros_like(dout)[..., None])
    dwindows = xp.reshape(dwindows, (b, c, *out_sp, *kernel))
    inverse = tuple(sorted(range(2 + 2 * d), key=_window_perm(d).__getitem__))
    dcrop = xp.reshape(
        xp.permute_dims(dwindows, inverse),
        (b, c, *(o * k for o, k in zip(out_sp, kernel, strict=True))),
    )
    # positions dropped by the floor get zero gradient: pad each spatial dim back to S_d
    for axis, (s, o, k) in enumerate(zip(spatial, out_sp, kernel, strict=True), start=2):
        missing = s - o * k
        if missing:
            pad_shape = list(dcrop.shape)
            pad_shape[axis] = missing
            zeros = xp.zeros(
                tuple(pad_shape), dtype=dout.dtype, device=array_api_compat.device(dout)
            )
            dcrop = xp.concat([dcrop, zeros], axis=axis)
    return dcrop


def forward_flat(
    u: Array, kernel: tuple[int, ...], spatial: tuple[int, ...]
) -> tuple[Array, MaxPoolCache]:
    """:func:`forward` on flattened positions: u (B, C, N) on the grid ``spatial`` (N =
    prod(spatial)) -> (B, C, N′) with N′ = prod(output_size(spatial, kernel))."""
    xp = namespace(u)
    b, c = u.shape[0], u.shape[1]
    out, cache = forward(xp.reshape(u, (b, c, *spatial)), kernel)
    return xp.reshape(out, (b, c, math.prod(out.shape[2:]))), cache


def backward_flat(dout: Array, cache: MaxPoolCache) -> Array:
    """:func:`backward` on flattened positions: (B, C, N′) -> (B, C, N)."""
    xp = namespace(dout)
    b, c, *spatial = cache.input_shape
    pooled = output_size(tuple(spatial), cache.kernel)
    dx = backward(xp.reshape(dout, (b, c, *pooled)), cache)
    return xp.reshape(dx, (b, c, math.prod(spatial)))
