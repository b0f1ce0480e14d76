r"""The Non-local block, forward and hand-derived backward, in the order of the paper's figure.

x (B, C, \*S) is flattened to (B, C, N), N = prod(S). P is the max-pool of
``cfg.sub_sample`` (the identity when None); N′ is the number of key positions it leaves.

Forward
-------
1. **embed**: queries, keys and values, by 1×1 projections (:mod:`~nlref.layers.projection`)

   .. math::

       \theta = W_\theta x + b_\theta,\quad \phi = P(W_\phi x + b_\phi),\quad
       g = P(W_g x + b_g),

   or :math:`\phi = W_\phi P(x) + b_\phi`, :math:`g = W_g P(x) + b_g` when
   ``cfg.pool_order == "before_projection"``. The Gaussian compares x itself: θ = x, φ = P(x).
2. **attend**: :math:`A = f(\theta, \phi) / \mathcal C(x)` (B, N, N′), the variant's
   pairwise function (:mod:`nlref.pairwise`).
3. **aggregate**: :math:`y = g A^\top` (B, C′, N), :math:`y_i = \sum_j A_{ij} g_j`.
4. **project out**: :math:`h = W_z y + b_z` (B, C, N).
5. **batch norm**: :math:`o = \mathrm{BN}(h)`, or :math:`o = h` when ``cfg.norm`` is None.
6. **residual**: :math:`z = o + x`.

Backward
--------
The same steps in reverse, each with its layer's hand-derived backward: z̄ → ō = z̄ → h̄ →
ȳ → (Ā, ḡ) → (θ̄, φ̄) → x̄. x reaches z along four paths, so its gradient is a sum of four:

.. math::

    \bar x = \bar x_\theta + \bar x_\phi + \bar x_g + \bar z.

Every step is a pure function. :func:`nlref.forward` runs this block, or, for problems too
large for it, :mod:`nlref.engine`, which runs these same steps in tiles and threads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._backend import Array
from .checks import check_cache, check_dz, check_forward
from .config import NonLocalConfig
from .layers import aggregate, batchnorm, maxpool, projection
from .layers.aggregate import AggregateCache
from .layers.batchnorm import BatchNormCache
from .layers.maxpool import MaxPoolCache
from .layers.projection import ProjectionCache
from .pairwise import get as get_pairwise
from .params import in_param_order

__all__ = ["BlockCache", "EmbedCache", "backward", "forward"]


@dataclass(frozen=True)
class EmbedCache:
    """How θ, φ or g was made from x: pool, projection, pool (each optional)."""

    pool_before: MaxPoolCache | None = None
    projected: ProjectionCache | None = None
    pool_after: MaxPoolCache | None = None


@dataclass(frozen=True)
class BlockCache:
    """Everything :func:`backward` needs: one cache per step, named after the step
    (``attend`` is the variant's own cache; ``aggregate`` holds A and g). After a
    training-mode forward with batch norm, ``updated_buffers`` holds the new running
    statistics (PyTorch's update: unbiased variance, momentum ``cfg.bn_momentum``), which
    :func:`apply_buffer_updates` applies; it is empty otherwise."""

    cfg: NonLocalConfig
    training: bool
    input_shape: tuple[int, ...]
    key_shape: tuple[int, ...]
    embed_theta: EmbedCache
    embed_phi: EmbedCache
    embed_g: EmbedCache
    attend: Any
    aggregate: AggregateCache
    project_out: ProjectionCache
    batch_norm: BatchNormCache | None
    updated_buffers: dict[str, Array] = field(default_factory=dict)

    @property
    def attention(self) -> Array:
        """The normalised pairwise weights A = f / C(x), of shape (B, N, N′)."""
        return self.aggregate.attention

    @property
    def values(self) -> Array:
        """g, the values the attention averages, (B, C′, N′) (for the Gaussian too)."""
        return self.aggregate.values

    def attention_rows(self, start: int, stop: int) -> Array:
        """Rows ``start:stop`` of the attention, (B, stop − start, N′)."""
        n = math.prod(self.input_shape[2:])
        if not (0 <= start < stop <= n):
            raise ValueError(f"expected 0 <= start < stop <= N={n}, got start={start}, stop={stop}")
        return self.attention[:, start:stop, :]


def forward(
    x: Array,
    params: Mapping[str, Array],
    cfg: NonLocalConfig,
    training: bool = True,
) -> tuple[Array, BlockCache]:
    """Run the Non-local block.

    Parameters
    ----------
    x : array, shape (B, C, \\*S)
        1 to 3 spatial dims, float32 or float64 (float32 in gives float32 out).
    params : mapping
        Name -> array of x's dtype and library (:func:`nlref.init_params`).
    cfg : NonLocalConfig
    training : bool
        Batch norm on batch statistics (True) or on its running statistics (False).

    Returns
    -------
    z : array, like x
    cache : BlockCache
        ``cache.attention`` is A (B, N, N′); ``cache.updated_buffers`` the new BN running
        statistics. Neither x nor params is modified.
    """
    xp = check_forward(x, params, cfg, training)
    b, c, *spatial = x.shape
    x_flat = xp.reshape(x, (b, c, math.prod(spatial)))  # (B, C, N)
    theta, phi, g, embed_caches = embed(x_flat, params, cfg, tuple(spatial))
    attention, attend_cache = attend(theta, phi, params, cfg)  # (B, N, N')
    y, aggregate_cache = aggregate.forward(attention, g)  # (B, C', N)
    h, project_cache = project("z", y, params)  # (B, C, N)
    o, bn_cache, updated = normalise(h, params, cfg, training)
    z = o + x_flat  # the residual connection
    cache = BlockCache(
        cfg=cfg, training=training, input_shape=tuple(x.shape), key_shape=cfg.key_shape(spatial),
        embed_theta=embed_caches[0], embed_phi=embed_caches[1], embed_g=embed_caches[2],
        attend=attend_cache, aggregate=aggregate_cache, project_out=project_cache,
        batch_norm=bn_cache, updated_buffers=updated,
    )  # fmt: skip
    return xp.reshape(z, tuple(x.shape)), cache


def backward(dz: Array, cache: BlockCache) -> tuple[Array, dict[str, Array]]:
    """The hand-derived backward of :func:`forward`.

    Parameters
    ----------
    dz : array, like z
    cache : the cache :func:`forward` returned

    Returns
    -------
    dx : array, like x
    grads : dict
        Name -> gradient for every trainable parameter (all params but the BN running
        statistics), in the order of :func:`nlref.param_shapes`.
    """
    check_cache(cache, BlockCache)
    xp = check_dz(dz, cache.aggregate.values, cache.input_shape, cache.aggregate.values.dtype)
    b, c, *spatial = cache.input_shape
    dz_flat = xp.reshape(dz, (b, c, math.prod(spatial)))
    grads: dict[str, Array] = {}
    # 6. z = o + x: ō = z̄, and z̄ reaches x directly
    dh = normalise_backward(dz_flat, cache.batch_norm, grads)  # 5. o = BN(h)
    dy = unproject("z", dh, cache.project_out, grads)  # 4. h = W_z y + b_z
    dattention, dg = aggregate.backward(dy, cache.aggregate)  # 3. y = g Aᵀ
    pair_grads = get_pairwise(cache.cfg.pairwise).backward(dattention, cache.attend)  # 2.
    grads.update(pair_grads.dextra)
    caches = (cache.embed_theta, cache.embed_phi, cache.embed_g)
    dx_theta, dx_phi, dx_g = embed_backward((pair_grads.dtheta, pair_grads.dphi, dg), caches, grads)
    dx = dz_flat + dx_theta + dx_phi + dx_g  # 1. the four paths from x to z
    return xp.reshape(dx, cache.input_shape), in_param_order(grads, cache.cfg)


# ─── The steps ────────────────────────────────────────────────────────────────────────────


def embed(
    x: Array, params: Mapping[str, Array], cfg: NonLocalConfig, spatial: tuple[int, ...]
) -> tuple[Array, Array, Array, tuple[EmbedCache, EmbedCache, EmbedCache]]:
    """Step 1: θ (B, C′, N), φ and g (B, C′, N′) from x (B, C, N), and their caches."""
    kernel = cfg.sub_sample
    pool_first = kernel is not None and cfg.pool_order == "before_projection"
    embeds = get_pairwise(cfg.pairwise).embeds
    pooled = None  # P(x) (B, C, N') and its cache, made once for φ and g
    if kernel is not None and (pool_first or not embeds):
        pooled = maxpool.forward_flat(x, kernel, spatial)
    if embeds:
        theta, theta_proj = project("theta", x, params)
        theta_cache = EmbedCache(projected=theta_proj)
        phi, phi_cache = embed_key("phi", x, params, cfg, spatial, pooled)
    else:  # the Gaussian: θ = x, φ = P(x)
        theta, theta_cache = x, EmbedCache()
        phi, phi_cache = x, EmbedCache()
        if pooled is not None:
            pooled_x, pool_x = pooled
            phi, phi_cache = pooled_x, EmbedCache(pool_before=pool_x)
    g, g_cache = embed_key("g", x, params, cfg, spatial, pooled)
    return theta, phi, g, (theta_cache, phi_cache, g_cache)


def embed_key(
    layer: str,
    x: Array,
    params: Mapping[str, Array],
    cfg: NonLocalConfig,
    spatial: tuple[int, ...],
    pooled: tuple[Array, MaxPoolCache] | None = None,
) -> tuple[Array, EmbedCache]:
    """A key-side embedding (φ or g of :func:`embed`, DNL's unary logits), (B, C′, N′):
    the projection ``layer`` of x at the key positions, P(W x + b), or W P(x) + b when
    ``cfg.pool_order == "before_projection"`` (``pooled``: P(x) and its cache, when already
    made), or W x + b without ``cfg.sub_sample``."""
    kernel = cfg.sub_sample
    if kernel is not None and cfg.pool_order == "before_projection":
        if pooled is None:
            pooled = maxpool.forward_flat(x, kernel, spatial)
        pooled_x, pool_cache = pooled  # P(x), (B, C, N')
        u, proj_cache = project(layer, pooled_x, params)  # W P(x) + b
        return u, EmbedCache(pool_before=pool_cache, projected=proj_cache)
    u, proj_cache = project(layer, x, params)  # W x + b
    if kernel is None:
        return u, EmbedCache(projected=proj_cache)
    u, pool_cache = maxpool.forward_flat(u, kernel, spatial)  # P(W x + b)
    return u, EmbedCache(projected=proj_cache, pool_after=pool_cache)


def embed_backward(
    grads_in: tuple[Array, Array, Array], caches: tuple[EmbedCache, ...], grads: dict[str, Array]
) -> tuple[Array, ...]:
    """Backward of :func:`embed`: from (θ̄, φ̄, ḡ), x̄ along the θ, φ and g paths (each
    (B, C, N)); the projections' gradients go into ``grads``."""
    steps = zip(("theta", "phi", "g"), grads_in, caches, strict=True)
    return tuple(unembed(layer, du, cache, grads) for layer, du, cache in steps)


def unembed(layer: str, du: Array, cache: EmbedCache, grads: dict[str, Array]) -> Array:
    """One path of :func:`embed_backward`: pool, projection and pool, each in reverse."""
    if cache.pool_after is not None:
        du = maxpool.backward_flat(du, cache.pool_after)
    if cache.projected is not None:
        du = unproject(layer, du, cache.projected, grads)
    if cache.pool_before is not None:
        du = maxpool.backward_flat(du, cache.pool_before)
    return du


def attend(
    theta: Array, phi: Array, params: Mapping[str, Array], cfg: NonLocalConfig
) -> tuple[Array, Any]:
    """Step 2: A = f(θ, φ) / C(x) (B, N, N′), by the variant of ``cfg.pairwise``."""
    variant = get_pairwise(cfg.pairwise)
    extra = {name: params[name] for name in variant.extra_params(cfg.inter_channels)}
    return variant.forward(theta, phi, extra, cfg.effective_scale)


def normalise(
    h: Array, params: Mapping[str, Array], cfg: NonLocalConfig, training: bool
) -> tuple[Array, BatchNormCache | None, dict[str, Array]]:
    """Step 5: BN(h), its cache and the updated running statistics (h itself without BN)."""
    if cfg.norm is None:
        return h, None, {}
    o, cache = batchnorm.forward(
        h, params["bn.weight"], params["bn.bias"], params["bn.running_mean"],
        params["bn.running_var"], training=training, eps=cfg.bn_eps, momentum=cfg.bn_momentum,
    )  # fmt: skip
    updated = {"bn.running_mean": cache.running_mean, "bn.running_var": cache.running_var}
    return o, cache, updated if training else {}


def normalise_backward(do: Array, cache: BatchNormCache | None, grads: dict[str, Array]) -> Array:
    """Backward of :func:`normalise`: h̄, with γ̄ and β̄ into ``grads``."""
    if cache is None:
        return do
    bn_grads = batchnorm.backward(do, cache)
    grads["bn.weight"], grads["bn.bias"] = bn_grads.dweight, bn_grads.dbias
    return bn_grads.dh


def project(layer: str, u: Array, params: Mapping[str, Array]) -> tuple[Array, ProjectionCache]:
    """W u + b with the weights of ``layer`` ("theta", "phi", "g" or "z")."""
    return projection.forward(u, params[f"{layer}.weight"], params.get(f"{layer}.bias"))


def unproject(layer: str, du: Array, cache: ProjectionCache, grads: dict[str, Array]) -> Array:
    """Backward of :func:`project`: ū, with the layer's W̄ (and b̄) into ``grads``."""
    proj_grads = projection.backward(du, cache)
    grads[f"{layer}.weight"] = proj_grads.dweight
    if proj_grads.dbias is not None:
        grads[f"{layer}.bias"] = proj_grads.dbias
    return proj_grads.dx
