r"""Layer normalisation over channels, per position, with a per-channel affine.

Shapes: input h of shape (B, C, N); γ and β of shape (C,). Each of the B·N columns
:math:`h_{b,:,n}` is normalised over its C channels. GCNet normalises its bottleneck
(C′ channels at N = 1 position) this way.

Forward
-------
.. math::

    \mu_{bn} = \frac1C \sum_c h_{bcn},\qquad
    \sigma^2_{bn} = \frac1C \sum_c (h_{bcn} - \mu_{bn})^2,\qquad
    \hat h = \frac{h - \mu}{\sqrt{\sigma^2 + \varepsilon}},\qquad
    o = \gamma\,\hat h + \beta.

The variance is the mean of squared deviations, never E[h²] − E[h]², and is formed from
the deviations scaled into [−1, 1] by the largest per column,
:math:`s_{bn} = \max_c |h_{bcn} - \mu_{bn}|`, as batch norm does
(:mod:`~nlref.layers.batchnorm`): :math:`\sigma^2 = s\,(s \cdot \frac1C \sum_c u_c^2)`
with :math:`u = (h - \mu)/s`, so that no intermediate overflows while σ² itself is finite.

Backward
--------
The same algebra as batch norm (:mod:`~nlref.layers.batchnorm`), with the mean over the
channels of one column instead of over (B, N) of one channel. With
:math:`\bar{\hat h} = \gamma\,\bar o` and :math:`r = (\sigma^2 + \varepsilon)^{-1/2}`:

.. math::

    \bar h = r\Big(\bar{\hat h} - \tfrac1C\textstyle\sum_c \bar{\hat h}
             - \hat h\,\tfrac1C\sum_c \bar{\hat h}\,\hat h\Big),\qquad
    \bar\gamma_c = \sum_{b,n} \bar o_{bcn}\,\hat h_{bcn},\qquad
    \bar\beta_c = \sum_{b,n} \bar o_{bcn}.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._backend import Array, namespace

__all__ = ["LayerNormCache", "LayerNormGrads", "backward", "forward"]


@dataclass(frozen=True)
class LayerNormCache:
    """What :func:`backward` needs from :func:`forward`."""

    normalised: Array  # ĥ, (B, C, N)
    inv_std: Array  # r = 1 / sqrt(σ² + ε), (B, 1, N)
    weight: Array  # γ, (C,)


@dataclass(frozen=True)
class LayerNormGrads:
    """Gradients of a layer norm: ``dh`` (B, C, N), ``dweight`` and ``dbias`` (C,)."""

    dh: Array
    dweight: Array
    dbias: Array


def forward(
    h: Array, weight: Array, bias: Array, eps: float = 1e-5
) -> tuple[Array, LayerNormCache]:
    """Normalise ``h`` (B, C, N) over its channels, then ``γ ĥ + β``; returns (out, cache)."""
    xp = namespace(h, weight, bias)
    c = h.shape[1]
    centred = h - xp.mean(h, axis=1, keepdims=True)  # h - μ
    # σ² (B, 1, N) from u = (h - μ) / s in [-1, 1]: Σ u² cannot overflow before σ² does
    peak = xp.max(xp.abs(centred), axis=1, keepdims=True)  # s
    peak = xp.where(peak > 0, peak, xp.ones_like(peak))  # all deviations 0: s = 1
    scaled = centred / peak
    var = peak * (peak * (xp.sum(scaled * scaled, axis=1, keepdims=True) / c))
    inv_std = 1.0 / xp.sqrt(var + eps)
    normalised = centred * inv_std
    out = weight[:, None] * normalised + bias[:, None]
    return out, LayerNormCache(normalised=normalised, inv_std=inv_std, weight=weight)


def backward(dout: Array, cache: LayerNormCache) -> LayerNormGrads:
    """Backward of :func:`forward` for the upstream gradient ``dout`` (B, C, N)."""
    xp = namespace(dout)
    xhat = cache.normalised
    dweight = xp.sum(dout * xhat, axis=(0, 2))  # forward was: o = γ ĥ + β
    dbias = xp.sum(dout, axis=(0, 2))
    dxhat = cache.weight[:, None] * dout
    # forward was: ĥ = (h - μ) r, μ and σ² over the channels of each column
    mean_dxhat = xp.mean(dxhat, axis=1, keepdims=True)
    mean_dxhat_xhat = xp.mean(dxhat * xhat, axis=1, keepdims=True)
    dh = cache.inv_std * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)
    return LayerNormGrads(dh=dh, dweight=dweight, dbias=dbias)
