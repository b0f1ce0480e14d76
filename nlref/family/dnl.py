r"""The disentangled non-local block (Yin et al., ECCV 2020), forward and hand-derived backward.

DNL splits the embedded Gaussian's attention into two terms that learn different things:
a **whitened pairwise** term, how much query i resembles key j once both have lost their
mean, and a **unary** term, how salient key j is, the same for every query (GCNet's
context). Everything else is the Non-local block's (:mod:`nlref.block`), whose steps this
module reuses with :attr:`DNLConfig.nonlocal_config`. x (B, C, \*S) is flattened to
(B, C, N); P is the max-pool of ``cfg.sub_sample`` (N′ key positions).

Forward
-------
1. **embed**: θ (B, C′, N), φ and g (B, C′, N′) exactly as in the Non-local block.
2. **whiten** (:mod:`~nlref.layers.whiten`): :math:`\hat\theta = \theta - \mu_\theta`,
   :math:`\hat\phi = \phi - \mu_\phi`, the means over the positions.
3. **pairwise** (the embedded Gaussian, then :mod:`~nlref.layers.aggregate`):

   .. math::

       A_{ij} = \operatorname{softmax}_j\big(\tfrac{\alpha}{\tau}\,
       \hat\theta_i^\top\hat\phi_j\big),\qquad y^\text{pair}_i = \sum_j A_{ij}\, g_j.

4. **unary** (:mod:`~nlref.layers.attention_pool`): one logit per key position, pooled
   like φ and g (:math:`m = P(w_m^\top x + b_m)`, or :math:`w_m^\top P(x) + b_m` with
   ``pool_order="before_projection"``; no P without ``sub_sample``),

   .. math::

       u_j = \operatorname{softmax}_j(m),\qquad y^\text{unary} = \sum_j u_j\, g_j
       \quad\text{(the same for every query } i\text{)}.

5. **project out, batch norm, residual**: :math:`z = \mathrm{BN}(W_z(y^\text{pair} +
   y^\text{unary}) + b_z) + x`, as in the Non-local block.

Backward
--------
5. → ȳ as in the Non-local block. 4. y^unary is broadcast over the queries, so
:math:`\bar y^\text{unary} = \sum_i \bar y_i`; the attention pool gives m̄ and
:math:`\bar g^\text{unary}`, and m̄ reaches x through the pool and the projection.
3. The embedded Gaussian's backward gives :math:`\bar{\hat\theta}`, :math:`\bar{\hat\phi}`
and :math:`\bar g^\text{pair}`. 2. The whitening is a projection:
:math:`\bar\theta = \bar{\hat\theta} - \text{mean}_n \bar{\hat\theta}` (same for φ).
1. The Non-local block's embed backward, with :math:`\bar g = \bar g^\text{pair} +
\bar g^\text{unary}` (g feeds both terms). x reaches z along five paths:

.. math::

    \bar x = \bar x_\theta + \bar x_\phi + \bar x_g + \bar x_m + \bar z.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .._backend import Array
from ..block import (
    EmbedCache,
    attend,
    embed,
    embed_backward,
    embed_key,
    normalise,
    normalise_backward,
    project,
    unembed,
    unproject,
)
from ..checks import check_cache, check_dz
from ..layers import aggregate, attention_pool, whiten
from ..layers.aggregate import AggregateCache
from ..layers.attention_pool import AttentionPoolCache
from ..layers.batchnorm import BatchNormCache
from ..layers.projection import ProjectionCache
from ..layers.whiten import WhitenCache
from ..pairwise import get as get_pairwise
from .config import DNLConfig
from .params import check_forward, in_param_order

__all__ = ["DNLCache", "backward", "forward"]


@dataclass(frozen=True)
class DNLCache:
    """Everything :func:`backward` needs, one cache per step; ``updated_buffers`` as in the
    Non-local block's cache (for :func:`nlref.apply_buffer_updates`)."""

    cfg: DNLConfig
    training: bool
    input_shape: tuple[int, ...]
    embed_theta: EmbedCache
    embed_phi: EmbedCache
    embed_g: EmbedCache
    whiten_theta: WhitenCache
    whiten_phi: WhitenCache
    attend: Any
    aggregate: AggregateCache
    mask: EmbedCache
    unary: AttentionPoolCache
    project_out: ProjectionCache
    batch_norm: BatchNormCache | None
    updated_buffers: dict[str, Array] = field(default_factory=dict)

    @property
    def attention(self) -> Array:
        """A, the whitened pairwise term, (B, N, N′); each row sums to 1."""
        return self.aggregate.attention

    @property
    def unary_attention(self) -> Array:
        """u, the unary term, (B, 1, N′): one row, shared by every query."""
        return self.unary.weights

    @property
    def values(self) -> Array:
        """g, the values both terms average, (B, C′, N′)."""
        return self.aggregate.values


def forward(
    x: Array, params: Mapping[str, Array], cfg: DNLConfig, training: bool = True
) -> tuple[Array, DNLCache]:
    """Run the disentangled non-local block: as :func:`nlref.forward`, with a
    :class:`DNLConfig` and the parameters of :func:`nlref.family.init_params`.

    Parameters
    ----------
    x : array, shape (B, C, \\*S)
    params : mapping
    cfg : DNLConfig
    training : bool
        Batch norm on batch statistics (True) or on its running statistics (False).

    Returns
    -------
    z : array, like x
    cache : DNLCache
        ``cache.attention`` is the pairwise term A (B, N, N′), ``cache.unary_attention``
        the unary term u (B, 1, N′).
    """
    xp = check_forward(x, params, cfg, training)
    block = cfg.nonlocal_config  # the embedded Gaussian, with scale α / τ
    b, c, *spatial = x.shape
    x_flat = xp.reshape(x, (b, c, math.prod(spatial)))
    theta, phi, g, embeds = embed(x_flat, params, block, tuple(spatial))  # 1.
    theta_hat, whiten_theta = whiten.forward(theta)  # 2. θ - μ_θ
    phi_hat, whiten_phi = whiten.forward(phi)  #    φ - μ_φ
    attention, attend_cache = attend(theta_hat, phi_hat, params, block)  # 3. (B, N, N')
    y_pair, aggregate_cache = aggregate.forward(attention, g)  # (B, C', N)
    # 4. the logits m (B, 1, N') of w_m, b_m at the key positions, pooled like φ and g
    m, mask_cache = embed_key("mask", x_flat, params, block, tuple(spatial))
    y_unary, unary_cache = attention_pool.forward(m, g)  # (B, C', 1)
    h, project_cache = project("z", y_pair + y_unary, params)  # 5.
    o, bn_cache, updated = normalise(h, params, block, training)
    z = o + x_flat  # the residual connection
    cache = DNLCache(
        cfg=cfg, training=training, input_shape=tuple(x.shape), embed_theta=embeds[0],
        embed_phi=embeds[1], embed_g=embeds[2], whiten_theta=whiten_theta,
        whiten_phi=whiten_phi, attend=attend_cache, aggregate=aggregate_cache,
        mask=mask_cache, unary=unary_cache, project_out=project_cache, batch_norm=bn_cache,
        updated_buffers=updated,
    )  # fmt: skip
    return xp.reshape(z, tuple(x.shape)), cache


def backward(dz: Array, cache: DNLCache) -> tuple[Array, dict[str, Array]]:
    """The hand-derived backward of :func:`forward`: ``(dx, grads)``, with a gradient for
    every trainable parameter, in the order of :func:`nlref.family.param_shapes`."""
    check_cache(cache, DNLCache)
    xp = check_dz(dz, cache.values, cache.input_shape, cache.values.dtype)
    b, c, *spatial = cache.input_shape
    dz_flat = xp.reshape(dz, (b, c, math.prod(spatial)))
    grads: dict[str, Array] = {}
    dh = normalise_backward(dz_flat, cache.batch_norm, grads)  # 5. z = BN(h) + x
    dy = unproject("z", dh, cache.project_out, grads)  # h = W_z y + b_z
    # 4. y = y_pair + y_unary, y_unary the same for every query i
    dm, dg_unary = attention_pool.backward(xp.sum(dy, axis=-1, keepdims=True), cache.unary)
    dx_mask = unembed("mask", dm, cache.mask, grads)  # through the pool and w_m
    # 3. y_pair = g Aᵀ, A = softmax(α/τ θ̂ᵀφ̂)
    dattention, dg_pair = aggregate.backward(dy, cache.aggregate)
    pair = get_pairwise("embedded_gaussian").backward(dattention, cache.attend)
    dtheta = whiten.backward(pair.dtheta, cache.whiten_theta)  # 2.
    dphi = whiten.backward(pair.dphi, cache.whiten_phi)
    caches = (cache.embed_theta, cache.embed_phi, cache.embed_g)  # 1. g feeds both terms
    dx_theta, dx_phi, dx_g = embed_backward((dtheta, dphi, dg_pair + dg_unary), caches, grads)
    dx = dz_flat + dx_theta + dx_phi + dx_g + dx_mask  # the five paths from x to z
    return xp.reshape(dx, cache.input_shape), in_param_order(grads, cache.cfg)
