r"""GCNet's global context block (Cao et al., 2019), forward and hand-derived backward.

GCNet starts from an observation about trained Non-local blocks: their attention maps are
almost the same for every query. So it computes *one* attention map, pools *one* global
context vector with it, and brings that vector to every position, as squeeze-and-excitation
does. x (B, C, \*S) is flattened to (B, C, N), N = prod(S); C′ = ``cfg.inter_channels``.

Forward
-------
1. **context** (``pooling="att"``): one logit per position, a softmax over the positions,
   and the weighted sum (:mod:`~nlref.layers.attention_pool`): the Non-local attention
   with the same row for every query,

   .. math::

       m = w_k^\top x + b_k \ (B, 1, N),\qquad \alpha_j = \operatorname{softmax}_j(m),
       \qquad c = \sum_j \alpha_j x_j \ (B, C, 1);

   with ``pooling="avg"``, :math:`c = \frac1N \sum_j x_j`.
2. **transform**, one per fusion f, a bottleneck of C′ channels with a layer norm:

   .. math::

       t_f = W_2\,\mathrm{ReLU}(\mathrm{LN}(W_1 c + b_1)) + b_2 \quad (B, C, 1).

3. **fusion**: :math:`z = x \odot \sigma(t_\text{mul}) + t_\text{add}` (gate first, then
   add, as mmcv and timm do); with one fusion, :math:`z = x \odot \sigma(t_\text{mul})` or
   :math:`z = x + t_\text{add}`. t is broadcast over the N positions.

Backward
--------
3. :math:`\bar t_\text{add} = \sum_n \bar z_n`; through the gate (:mod:`~nlref.layers.gate`)
   :math:`\bar x_\text{fuse} = \bar z \odot \sigma(t_\text{mul})`,
   :math:`\bar t_\text{mul} = \sigma'(t_\text{mul}) \sum_n \bar z_n \odot x_n`
   (:math:`\bar x_\text{fuse} = \bar z` without the gate).
2. Each transform in reverse (projection, ReLU, layer norm, projection); c feeds every
   transform, so :math:`\bar c = \sum_f \bar c_f`.
1. ``att``: :math:`\bar\alpha_j = \bar c^\top x_j`,
   :math:`\bar x_\text{values} = \bar c\,\alpha^\top`,
   :math:`\bar m = \alpha \odot (\bar\alpha - \textstyle\sum_k \alpha_k\bar\alpha_k)`,
   :math:`\bar x_\text{mask} = w_k \bar m`, :math:`\bar w_k = \sum_{b} x\,\bar m^\top`,
   :math:`\bar b_k = \sum_{b,n} \bar m = 0` (a softmax ignores a shift).
   ``avg``: :math:`\bar x_\text{values} = \bar c / N` at every position.

x reaches z along three paths (two with ``avg``), so its gradient is a sum of three:

.. math::

    \bar x = \bar x_\text{fuse} + \bar x_\text{values} + \bar x_\text{mask}.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from .._backend import Array
from ..block import project, unproject
from ..checks import check_cache, check_dz
from ..layers import attention_pool, gate, global_pool, layernorm, relu
from ..layers.attention_pool import AttentionPoolCache
from ..layers.gate import GateCache
from ..layers.layernorm import LayerNormCache
from ..layers.projection import ProjectionCache
from .config import GCNetConfig
from .params import check_forward, in_param_order

__all__ = ["GCNetCache", "TransformCache", "backward", "forward"]


@dataclass(frozen=True)
class TransformCache:
    """One transform t = W₂ ReLU(LN(W₁c + b₁)) + b₂, step by step."""

    fc1: ProjectionCache
    norm: LayerNormCache
    relu: relu.ReluCache
    fc2: ProjectionCache


@dataclass(frozen=True)
class GCNetCache:
    """Everything :func:`backward` needs, one cache per step. ``mask`` and ``context`` are
    the context's logits and pooling (``mask`` is None with ``pooling="avg"``); ``gate`` is
    None without ``channel_mul``. ``updated_buffers`` is always empty (GCNet has no batch
    norm); it is there so that :func:`nlref.apply_buffer_updates` accepts the cache."""

    cfg: GCNetConfig
    training: bool
    input_shape: tuple[int, ...]
    mask: ProjectionCache | None
    context: AttentionPoolCache | global_pool.GlobalPoolCache
    transforms: dict[str, TransformCache]
    gate: GateCache | None
    updated_buffers: dict[str, Array] = field(default_factory=dict)

    @property
    def attention(self) -> Array:
        """α, the one attention map shared by every query, (B, 1, N) (``pooling="att"``)."""
        if not isinstance(self.context, AttentionPoolCache):
            raise AttributeError('pooling="avg" has no attention map: every α_j is 1/N')
        return self.context.weights

    @property
    def global_context(self) -> Array:
        """c, the pooled context vector, (B, C, 1)."""
        return next(iter(self.transforms.values())).fc1.x


def forward(
    x: Array, params: Mapping[str, Array], cfg: GCNetConfig, training: bool = True
) -> tuple[Array, GCNetCache]:
    """Run the global context block.

    Parameters
    ----------
    x : array, shape (B, C, \\*S)
        1 to 3 spatial dims, float32 or float64.
    params : mapping
        Name -> array of x's dtype and library (:func:`nlref.family.init_params`).
    cfg : GCNetConfig
    training : bool
        Accepted for the Non-local block's contract; GCNet computes the same in both modes
        (its layer norm has no running statistics).

    Returns
    -------
    z : array, like x
    cache : GCNetCache
    """
    xp = check_forward(x, params, cfg, training)
    b, c, *spatial = x.shape
    x_flat = xp.reshape(x, (b, c, math.prod(spatial)))  # (B, C, N)
    context, mask_cache, context_cache = pool_context(x_flat, params, cfg)  # 1. (B, C, 1)
    terms, transforms = {}, {}
    for fusion in cfg.fusion:  # 2. t_f = W₂ ReLU(LN(W₁ c + b₁)) + b₂
        terms[fusion], transforms[fusion] = transform(fusion, context, params, cfg.ln_eps)
    z, gate_cache = x_flat, None
    if "channel_mul" in terms:  # 3. x ⊙ σ(t_mul) ...
        z, gate_cache = gate.forward(x_flat, terms["channel_mul"])
    if "channel_add" in terms:  # ... + t_add
        z = z + terms["channel_add"]
    cache = GCNetCache(
        cfg=cfg, training=training, input_shape=tuple(x.shape), mask=mask_cache,
        context=context_cache, transforms=transforms, gate=gate_cache,
    )  # fmt: skip
    return xp.reshape(z, tuple(x.shape)), cache


def backward(dz: Array, cache: GCNetCache) -> tuple[Array, dict[str, Array]]:
    """The hand-derived backward of :func:`forward`: ``(dx, grads)``, with a gradient for
    every parameter, in the order of :func:`nlref.family.param_shapes`."""
    check_cache(cache, GCNetCache)
    like = cache.global_context
    xp = check_dz(dz, like, cache.input_shape, like.dtype)
    b, c, *spatial = cache.input_shape
    dz_flat = xp.reshape(dz, (b, c, math.prod(spatial)))
    grads: dict[str, Array] = {}
    dterms = {}
    if "channel_add" in cache.transforms:  # 3. z = ... + t_add, t_add broadcast over n
        dterms["channel_add"] = xp.sum(dz_flat, axis=-1, keepdims=True)
    dx_fuse = dz_flat
    if cache.gate is not None:  # z = x ⊙ σ(t_mul) ...
        dx_fuse, dterms["channel_mul"] = gate.backward(dz_flat, cache.gate)
    dcontexts = [
        untransform(f, dterms[f], tc, grads) for f, tc in cache.transforms.items()
    ]  # 2. c feeds every transform
    dcontext = dcontexts[0] if len(dcontexts) == 1 else dcontexts[0] + dcontexts[1]
    dx_values, dx_mask = unpool_context(dcontext, cache, grads)  # 1.
    dx = dx_fuse + dx_values + dx_mask  # the three paths from x to z
    return xp.reshape(dx, cache.input_shape), in_param_order(grads, cache.cfg)


# ─── The steps ────────────────────────────────────────────────────────────────────────────


def pool_context(
    x: Array, params: Mapping[str, Array], cfg: GCNetConfig
) -> tuple[Array, ProjectionCache | None, AttentionPoolCache | global_pool.GlobalPoolCache]:
    """Step 1: the global context c (B, C, 1) of x (B, C, N), and the caches."""
    if cfg.pooling == "avg":
        c, avg_cache = global_pool.forward(x)  # (1/N) Σⱼ xⱼ, (B, C)
        return c[:, :, None], None, avg_cache
    m, mask_cache = project("mask", x, params)  # m = w_kᵀ x + b_k, (B, 1, N)
    c, pool_cache = attention_pool.forward(m, x)  # Σⱼ softmax(m)ⱼ xⱼ
    return c, mask_cache, pool_cache


def unpool_context(
    dc: Array, cache: GCNetCache, grads: dict[str, Array]
) -> tuple[Array, Array | float]:
    """Backward of :func:`pool_context`: x̄ along the values path and along the mask path
    (0 with ``avg``); w̄_k and b̄_k go into ``grads``."""
    if cache.mask is None:
        return global_pool.backward(dc[:, :, 0], cache.context), 0.0
    dm, dx_values = attention_pool.backward(dc, cache.context)
    return dx_values, unproject("mask", dm, cache.mask, grads)


def transform(
    fusion: str, c: Array, params: Mapping[str, Array], eps: float
) -> tuple[Array, TransformCache]:
    """Step 2: t = W₂ ReLU(LN(W₁c + b₁)) + b₂ (B, C, 1), with the weights of ``fusion``."""
    h, fc1 = project(f"{fusion}.fc1", c, params)  # (B, C', 1)
    n, norm = layernorm.forward(
        h, params[f"{fusion}.norm.weight"], params[f"{fusion}.norm.bias"], eps
    )
    a, relu_cache = relu.forward(n)
    t, fc2 = project(f"{fusion}.fc2", a, params)  # (B, C, 1)
    return t, TransformCache(fc1=fc1, norm=norm, relu=relu_cache, fc2=fc2)


def untransform(fusion: str, dt: Array, cache: TransformCache, grads: dict[str, Array]) -> Array:
    """Backward of :func:`transform`: c̄ (B, C, 1), the transform's gradients into ``grads``."""
    da = unproject(f"{fusion}.fc2", dt, cache.fc2, grads)
    dn = relu.backward(da, cache.relu)
    norm = layernorm.backward(dn, cache.norm)
    grads[f"{fusion}.norm.weight"], grads[f"{fusion}.norm.bias"] = norm.dweight, norm.dbias
    return unproject(f"{fusion}.fc1", norm.dh, cache.fc1, grads)
