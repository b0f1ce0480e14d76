r"""Batch normalisation over (B, N) per channel, in training and in evaluation mode.

Shapes: input h of shape (B, C, N); γ, β, running mean μ_r and running variance σ²_r of
shape (C,). M = B·N values per channel.

Forward, training
-----------------
.. math::

    \mu_c = \frac1M \sum_{b,n} h_{b,c,n},\qquad
    \sigma^2_c = \frac1M \sum_{b,n} (h_{b,c,n} - \mu_c)^2 \quad\text{(biased)},

.. math::

    \hat h = \frac{h - \mu}{\sqrt{\sigma^2 + \varepsilon}},\qquad
    o = \gamma\, \hat h + \beta.

The variance is the mean of squared deviations, never E[h²] − E[h]² (which cancels
catastrophically). It is computed on deviations scaled by their largest magnitude per
channel, :math:`s_c = \max_{b,n} |h_{b,c,n} - \mu_c|` (1 where all are 0):

.. math::

    \sigma^2_c = s_c \Big( s_c \cdot \frac1M \sum_{b,n} u_{b,c,n}^2 \Big),\qquad
    u = \frac{h - \mu}{s} \in [-1, 1].

The same number, but no intermediate exceeds the result: formed directly, the sum
Σ(h − μ)² is M times the variance, and overflows (in float32, beyond 3.4e38) once the
variance exceeds 3.4e38 / M, while the variance itself is still representable. Here
Σu² ≤ M, its mean ≤ 1, and s·(s·mean) ≤ σ² up to rounding, so σ² is finite whenever its
value is. The scaling costs one division per element and a few ulps in σ².

The running statistics are updated as PyTorch does, with the *unbiased* variance:

.. math::

    \mu_r \leftarrow (1-m)\,\mu_r + m\,\mu,\qquad
    \sigma^2_r \leftarrow (1-m)\,\sigma^2_r + m\,\frac{M}{M-1}\,\sigma^2.

(m σ² is formed before the factor M/(M−1), which could take a variance just below the
dtype's largest number above it.)

They are returned in the cache (``running_mean``, ``running_var``); nothing is mutated.

Backward, training
------------------
With :math:`\bar{\hat h} = \gamma\,\bar o` and :math:`r = (\sigma^2+\varepsilon)^{-1/2}`,
differentiating through μ and σ² (both depend on every h in the channel) gives

.. math::

    \bar h = \frac{r}{M}\Big(M\,\bar{\hat h} - \sum_{b,n}\bar{\hat h}
             - \hat h \sum_{b,n} \bar{\hat h}\,\hat h\Big),\qquad
    \bar\gamma = \sum_{b,n} \bar o\,\hat h,\qquad
    \bar\beta = \sum_{b,n} \bar o.

Forward and backward, evaluation
--------------------------------
μ_r and σ²_r are constants, so the layer is affine per channel:

.. math::

    o = \gamma\,\frac{h-\mu_r}{\sqrt{\sigma^2_r+\varepsilon}} + \beta,\qquad
    \bar h = \gamma\,\frac{\bar o}{\sqrt{\sigma^2_r+\varepsilon}}.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._backend import Array, namespace

__all__ = ["BatchNormCache", "BatchNormGrads", "backward", "forward"]


@dataclass(frozen=True)
class BatchNormCache:
    """What :func:`backward` needs, plus the updated running statistics."""

    training: bool
    normalised: Array  # (B, C, N), \hat h
    inv_std: Array  # (C,), 1 / sqrt(var + eps) (batch var in training, running var in eval)
    weight: Array  # (C,), gamma
    running_mean: Array  # (C,), updated in training mode, unchanged in eval mode
    running_var: Array  # (C,), updated (unbiased) in training mode, unchanged in eval mode


@dataclass(frozen=True)
class BatchNormGrads:
    """Gradients of batch norm: ``dh`` (B, C, N), ``dweight`` and ``dbias`` (C,)."""

    dh: Array
    dweight: Array
    dbias: Array


def forward(
    h: Array,
    weight: Array,
    bias: Array,
    running_mean: Array,
    running_var: Array,
    *,
    training: bool,
    eps: float = 1e-5,
    momentum: float = 0.1,
) -> tuple[Array, BatchNormCache]:
    """Batch-normalise ``h`` (B, C, N) per channel; returns (out, cache)."""
    xp = namespace(h, weight, bias, running_mean, running_var)
    if training:
        m = h.shape[0] * h.shape[2]
        if m < 2:
            raise ValueError(
                "batch norm in training mode needs more than 1 value per channel "
                f"(B·N = {m} for input of shape {tuple(h.shape)}), as in PyTorch; "
                "use training=False or a larger batch"
            )
        mean = xp.mean(h, axis=(0, 2))
        centred = h - mean[:, None]
        # biased variance, the mean of squared deviations, on deviations scaled into
        # [-1, 1] so that their sum of squares cannot overflow before the variance does
        peak = xp.max(xp.abs(centred), axis=(0, 2))  # s (C,)
        peak = xp.where(peak > 0, peak, xp.ones_like(peak))  # all deviations 0: s = 1
        scaled = centred / peak[:, None]  # u
        # sum of u² over N as one vecdot per (b, c), then over B
        var = peak * (peak * (xp.sum(xp.vecdot(scaled, scaled, axis=-1), axis=0) / m))
        inv_std = 1.0 / xp.sqrt(var + eps)
        normalised = centred * inv_std[:, None]
        new_mean = (1.0 - momentum) * running_mean + momentum * mean
        # momentum before M/(M-1): the unbiased variance alone may exceed float32's max
        new_var = (1.0 - momentum) * running_var + (momentum * var) * (m / (m - 1))
    else:
        inv_std = 1.0 / xp.sqrt(running_var + eps)
        normalised = (h - running_mean[:, None]) * inv_std[:, None]
        new_mean, new_var = running_mean, running_var
    out = weight[:, None] * normalised + bias[:, None]
    cache = BatchNormCache(
        training=training,
        normalised=normalised,
        inv_std=inv_std,
        weight=weight,
        running_mean=new_mean,
        running_var=new_var,
    )
    return out, cache


def backward(dout: Array, cache: BatchNormCache) -> BatchNormGrads:
    """Backward of :func:`forward` for the upstream gradient ``dout`` (B, C, N)."""
    xp = namespace(dout)
    xhat = cache.normalised
    dweight = xp.sum(xp.vecdot(dout, xhat, axis=-1), axis=0)  # sum over (B, N) of dout xhat
    dbias = xp.sum(dout, axis=(0, 2))
    # forward was: out = gamma * xhat + beta, so dxhat = gamma * dout and, summed over
    # (B, N), mean(dxhat) = gamma * dbias / M and mean(dxhat * xhat) = gamma * dweight / M
    gamma_inv_std = cache.weight * cache.inv_std  # (C,)
    if cache.training:
        # forward was: xhat = (h - mean(h)) / sqrt(var(h) + eps), mean and var over (B, N)
        m = dout.shape[0] * dout.shape[2]
        # dh = inv_std * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
        #    = gamma * inv_std * (dout - dbias / M - xhat * dweight / M)
        dh = gamma_inv_std[:, None] * (dout - (dbias / m)[:, None] - xhat * (dweight / m)[:, None])
    else:
        dh = dout * gamma_inv_std[:, None]  # forward was: xhat = (h - mu_r) * inv_std
    return BatchNormGrads(dh=dh, dweight=dweight, dbias=dbias)
