r"""The whole Non-local block: forward and hand-derived backward, composed from the layers.

Shapes: x (B, C, \*S) with N = prod(S); θ (B, C′, N); φ and g (B, C′, N′) with N′ the
number of key positions after pooling; attention A (B, N, N′); y (B, C′, N); z like x.

Forward
-------
.. math::

    \theta = W_\theta x + b_\theta,\qquad
    \phi = P(W_\phi x + b_\phi),\qquad
    g = P(W_g x + b_g)\qquad(\text{pool after projection})

or :math:`\phi = W_\phi P(x) + b_\phi`, :math:`g = W_g P(x) + b_g` (pool before), where P
is the max-pool of ``cfg.sub_sample`` (identity when None). The Gaussian uses θ = x and
φ = P(x). Then

.. math::

    A = f(\theta, \phi) / C(x),\qquad y = g A^\top,\qquad
    z = \mathrm{BN}(W_z y + b_z) + x.

Backward
--------
Unwind the same steps in reverse. x reaches z along four paths (θ, φ, g and the
residual), so its gradient is the sum of four terms:

.. math::

    \bar x = \bar x_\theta + \bar x_\phi + \bar x_g + \bar z.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._backend import Array, namespace
from .config import NonLocalConfig
from .layers import aggregate, batchnorm, maxpool, projection
from .pairwise import PairwiseGrads
from .pairwise import get as get_pairwise
from .params import check_params, param_shapes
from .perf import (
    AttentionNotStoredError,
    AttentionPlan,
    available_memory,
    chunk_memory,
    plan_attention,
)

__all__ = ["BlockCache", "apply_buffer_updates", "backward", "forward"]


@dataclass(frozen=True)
class BranchCache:
    """One branch: optional pool of x, optional projection, then optional pool."""

    input_pool: maxpool.MaxPoolCache | None  # pool before the projection (shared pool of x)
    projection: projection.ProjectionCache | None
    output_pool: maxpool.MaxPoolCache | None  # pool after the projection


@dataclass(frozen=True)
class ChunkedAttentionCache:
    r"""The attention evaluated in blocks of queries, and recomputed block by block.

    Row i of the attention depends on θᵢ and on all of φ only (each pairwise function
    normalises one query row at a time), so for a block of queries Q = [i₀, i₁)

    .. math::

        A_Q = f(\theta_Q, \phi) / C(x)_Q,\qquad y_Q = g\,A_Q^\top,

    and the backward of a block is the unchunked backward applied to that block:

    .. math::

        \bar A_Q = \bar y_Q^\top g,\qquad \bar g = \sum_Q \bar y_Q A_Q,\qquad
        (\bar\theta_Q, \bar\phi_Q, \bar w_Q) = \text{variant.backward}(\bar A_Q),\qquad
        \bar\phi = \sum_Q \bar\phi_Q.

    Attributes
    ----------
    theta : array (B, C′, N)
    phi, values : arrays (B, C′, N′)
        φ and g (for the Gaussian, θ = x and φ = P(x), with C channels).
    extra : dict
        The variant's own weights (``concat.weight``).
    scale : float
    chunk_size : int
        Queries per block (the last block may be shorter).
    """

    pairwise: str
    theta: Array
    phi: Array
    values: Array
    extra: dict[str, Array]
    scale: float
    chunk_size: int

    def bounds(self) -> list[tuple[int, int]]:
        """The query blocks [i₀, i₁), in order."""
        n, k = self.theta.shape[-1], self.chunk_size
        return [(i, min(i + k, n)) for i in range(0, n, k)]

    def block(self, start: int, stop: int) -> tuple[Array, Any]:
        """The attention rows ``start:stop`` (B, stop − start, N′) and the variant's cache."""
        variant = get_pairwise(self.pairwise)
        theta_rows = self.theta[:, :, start:stop]  # (B, C', stop - start)
        return variant.forward(theta_rows, self.phi, self.extra, self.scale)


@dataclass(frozen=True)
class BlockCache:
    """Everything :func:`backward` needs, plus the attention and the new BN statistics.

    Attributes
    ----------
    cfg : NonLocalConfig
    training : bool
    input_shape : tuple
        (B, C, \\*S).
    key_shape : tuple
        Spatial shape of the keys after pooling; N′ = prod(key_shape).
    theta, phi, g : BranchCache
        The query branch and the two key-side branches. A shared pool of x (pool before
        projection, and the Gaussian's φ = pool(x)) appears as ``input_pool``.
    pairwise : object or None
        The variant's own cache; None when the queries ran in chunks.
    aggregate : AggregateCache or None
        The cache of y = g Aᵀ (it holds the attention); None when the queries ran in chunks.
    z : cache of W_z y + b_z.
    bn : BatchNormCache or None
    updated_buffers : dict
        ``{"bn.running_mean": ..., "bn.running_var": ...}`` after a training-mode forward
        with batch norm (PyTorch's update, unbiased variance, momentum ``cfg.bn_momentum``);
        empty otherwise. ``forward`` never mutates ``params``: apply these yourself, or call
        :func:`apply_buffer_updates`.
    plan : AttentionPlan or None
        How the attention was evaluated: all queries at once (``plan.materialised``) or in
        ``plan.n_chunks`` blocks of ``plan.chunk_size`` queries, and why.
    chunked : ChunkedAttentionCache or None
        θ, φ, g and the variant's weights, from which the backward recomputes each block of
        the attention; None when the attention was materialised.
    """

    cfg: NonLocalConfig
    training: bool
    input_shape: tuple[int, ...]
    key_shape: tuple[int, ...]
    dtype: Any
    theta: BranchCache
    phi: BranchCache
    g: BranchCache
    pairwise: Any
    aggregate: aggregate.AggregateCache | None
    z: projection.ProjectionCache
    bn: batchnorm.BatchNormCache | None
    updated_buffers: dict[str, Array] = field(default_factory=dict)
    plan: AttentionPlan | None = None
    chunked: ChunkedAttentionCache | None = None

    @property
    def attention(self) -> Array:
        """The normalised pairwise weights f / C(x), of shape (B, N, N′).

        Raises
        ------
        AttentionNotStoredError
            (an ``AttributeError``) when the forward ran in chunks of queries and never held
            the whole array; the message says how to get it.
        """
        if self.aggregate is None:
            b, _, *spatial = self.input_shape
            n, n_keys = math.prod(spatial), math.prod(self.key_shape)
            plan = self.plan
            raise AttentionNotStoredError(
                f"the attention (B, N, N′) = ({b}, {n}, {n_keys}) was not materialised: "
                f"forward evaluated the queries in {plan.n_chunks} chunks of "
                f"{plan.chunk_size} ({plan.reason}), and backward recomputes each chunk. "
                "Use cache.attention_rows(start, stop) for a block of query rows, or run "
                f"forward(..., chunk_size={n}) to materialise all of it"
            )
        return self.aggregate.attention

    def attention_rows(self, start: int, stop: int) -> Array:
        """Rows ``start:stop`` of the attention, shape (B, stop − start, N′).

        A slice of the cached attention when it was materialised; otherwise recomputed from
        θ and φ with the same formula as the forward (exact, like the chunks themselves).
        """
        n = math.prod(self.input_shape[2:])
        if not (0 <= start < stop <= n):
            raise ValueError(f"expected 0 <= start < stop <= N={n}, got start={start}, stop={stop}")
        if self.aggregate is not None:
            return self.aggregate.attention[:, start:stop, :]
        rows, _ = self.chunked.block(start, stop)
        return rows


def forward(
    x: Array,
    params: Mapping[str, Array],
    cfg: NonLocalConfig,
    training: bool = True,
    *,
    chunk_size: int | None = None,
    memory_limit: int | None = None,
) -> tuple[Array, BlockCache]:
    """Run the Non-local block.

    Parameters
    ----------
    x : array, shape (B, C, *S)
        1 to 3 spatial dims, real floating dtype (float32 in gives float32 out).
    params : mapping
        Name -> array, as made by :func:`nlref.init_params`; dtype and library must match x.
    cfg : NonLocalConfig
    training : bool
        Batch norm mode: batch statistics (True) or running statistics (False).
    chunk_size : int or None
        Evaluate the attention in blocks of this many queries, and recompute each block in
        the backward instead of caching the (B, N, N′) attention: exact (every pairwise
        function normalises each query row on its own), in O(B·chunk_size·N′) memory.
        ``chunk_size >= N`` means all queries at once. None (default): all at once when the
        attention needs at most :data:`nlref.perf.ATTENTION_MEMORY_LIMIT` bytes (256 MiB)
        and fits in memory, else blocks of about :data:`nlref.perf.CHUNK_MEMORY` bytes
        (8 MiB; :data:`nlref.perf.CHUNK_MEMORY_GPU`, 256 MiB, for CuPy arrays).
    memory_limit : int or None
        Bytes the block may use; None: what the system reports available
        (:func:`nlref.perf.available_memory`). Checked against an estimate before anything
        is allocated.

    Returns
    -------
    z : array, shape (B, C, *S)
    cache : BlockCache
        ``cache.attention`` is (B, N, N′) when it was materialised (``cache.plan`` says);
        ``cache.updated_buffers`` holds the new BN running statistics in training mode.
        Neither x nor params is mutated.

    Raises
    ------
    MemoryLimitError
        When even the smallest chunked evaluation would not fit in ``memory_limit`` (or in
        the memory available), before anything is allocated.
    """
    _check_config(cfg)
    xp = _check_x(x, cfg)
    check_params(params, cfg, x)
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {training!r}")
    variant = get_pairwise(cfg.pairwise)
    b, c, *spatial = x.shape
    spatial = tuple(spatial)
    kernel = cfg.sub_sample
    key_shape = spatial if kernel is None else maxpool.output_size(spatial, kernel)
    if memory_limit is not None and (isinstance(memory_limit, bool) or memory_limit < 1):
        raise ValueError(f"memory_limit must be None or a positive int, got {memory_limit!r}")
    plan = plan_attention(
        tuple(x.shape),
        math.prod(key_shape),
        cfg.inter_channels,
        _itemsize(xp, x.dtype),
        chunk_size=chunk_size,
        available=available_memory(x) if memory_limit is None else int(memory_limit),
        block_bytes=chunk_memory(x),
    )
    xf = xp.reshape(x, (b, c, math.prod(spatial)))  # (B, C, N)

    def project(layer: str, inp: Array) -> tuple[Array, projection.ProjectionCache]:
        return projection.forward(inp, params[f"{layer}.weight"], params.get(f"{layer}.bias"))

    def pool(u: Array) -> tuple[Array, maxpool.MaxPoolCache]:  # (B, C*, N) -> (B, C*, N')
        out, pool_cache = maxpool.forward(xp.reshape(u, (b, u.shape[1], *spatial)), kernel)
        return xp.reshape(out, (b, u.shape[1], -1)), pool_cache

    before = kernel is not None and cfg.pool_order == "before_projection"
    pooled_x, pool_x = None, None
    if kernel is not None and (before or not variant.embeds):
        pooled_x, pool_x = pool(xf)  # (B, C, N')

    def key_branch(layer: str) -> tuple[Array, BranchCache]:
        u, proj_cache = project(layer, pooled_x if before else xf)
        pool_cache = None
        if kernel is not None and not before:
            u, pool_cache = pool(u)
        input_pool = pool_x if before else None
        return u, BranchCache(input_pool=input_pool, projection=proj_cache, output_pool=pool_cache)

    # queries theta (B, C', N) and keys phi (B, C', N'); the Gaussian compares x itself
    if variant.embeds:
        theta, theta_proj = project("theta", xf)
        theta_cache = BranchCache(input_pool=None, projection=theta_proj, output_pool=None)
        phi, phi_cache = key_branch("phi")
    else:
        theta, theta_cache = xf, BranchCache(input_pool=None, projection=None, output_pool=None)
        phi = xf if pooled_x is None else pooled_x
        phi_cache = BranchCache(input_pool=pool_x, projection=None, output_pool=None)
    g, g_cache = key_branch("g")  # values (B, C', N')

    extra = {name: params[name] for name in variant.extra_params(cfg.inter_channels)}
    pairwise_cache, aggregate_cache, chunked = None, None, None
    if plan.materialised:
        attention, pairwise_cache = variant.forward(theta, phi, extra, cfg.effective_scale)
        y, aggregate_cache = aggregate.forward(attention, g)  # (B, C', N)
        del attention  # held by the caches
    else:  # the same formulas on blocks of query rows; nothing of size N x N' is kept
        chunked = ChunkedAttentionCache(
            pairwise=cfg.pairwise,
            theta=theta,
            phi=phi,
            values=g,
            extra=extra,
            scale=cfg.effective_scale,
            chunk_size=plan.chunk_size,
        )
        y_blocks = []
        for start, stop in chunked.bounds():
            attention_rows, _ = chunked.block(start, stop)  # (B, stop - start, N')
            y_blocks.append(aggregate.forward(attention_rows, g)[0])  # (B, C', stop - start)
            del attention_rows
        y = xp.concat(y_blocks, axis=2)  # (B, C', N)
        del y_blocks
    w, z_cache = project("z", y)  # (B, C, N)

    bn_cache, updated = None, {}
    if cfg.norm == "batchnorm":
        w, bn_cache = batchnorm.forward(
            w,
            params["bn.weight"],
            params["bn.bias"],
            params["bn.running_mean"],
            params["bn.running_var"],
            training=training,
            eps=cfg.bn_eps,
            momentum=cfg.bn_momentum,
        )
        if training:
            updated = {
                "bn.running_mean": bn_cache.running_mean,
                "bn.running_var": bn_cache.running_var,
            }
    w += xf  # residual connection, in place: w is an array forward made itself
    z = xp.reshape(w, tuple(x.shape))

    cache = BlockCache(
        cfg=cfg,
        training=training,
        input_shape=tuple(x.shape),
        key_shape=tuple(key_shape),
        dtype=x.dtype,
        theta=theta_cache,
        phi=phi_cache,
        g=g_cache,
        pairwise=pairwise_cache,
        aggregate=aggregate_cache,
        z=z_cache,
        bn=bn_cache,
        updated_buffers=updated,
        plan=plan,
        chunked=chunked,
    )
    return z, cache


def backward(dz: Array, cache: BlockCache) -> tuple[Array, dict[str, Array]]:
    """Hand-derived backward of :func:`forward`.

    Parameters
    ----------
    dz : array
        Upstream gradient, same shape, dtype and library as the forward's output.
    cache : BlockCache
        From :func:`forward`.

    Returns
    -------
    dx : array, shape (B, C, *S)
    grads : dict
        Name -> gradient for every trainable parameter (all keys of the params except the
        BN running statistics), in the canonical order of :func:`nlref.param_shapes`.
    """
    if not isinstance(cache, BlockCache):
        raise TypeError(
            f"cache must be the BlockCache returned by forward, got {type(cache).__name__}"
        )
    xp = _check_dz(dz, cache)
    cfg = cache.cfg
    variant = get_pairwise(cfg.pairwise)
    b, c, *spatial = cache.input_shape
    spatial = tuple(spatial)
    dzf = xp.reshape(dz, (b, c, math.prod(spatial)))  # (B, C, N)
    grads: dict[str, Array] = {}

    def unpool(du: Array, pool_cache: maxpool.MaxPoolCache | None) -> Array:
        if pool_cache is None:
            return du
        du = xp.reshape(du, (b, du.shape[1], *cache.key_shape))
        return xp.reshape(maxpool.backward(du, pool_cache), (b, du.shape[1], -1))

    def unproject(layer: str, du: Array, proj_cache: projection.ProjectionCache) -> Array:
        proj_grads = projection.backward(du, proj_cache)
        grads[f"{layer}.weight"] = proj_grads.dweight
        if proj_grads.dbias is not None:
            grads[f"{layer}.bias"] = proj_grads.dbias
        return proj_grads.dx

    def branch_backward(layer: str, du: Array, branch: BranchCache) -> Array:
        du = unpool(du, branch.output_pool)  # forward was: pool after the projection
        if branch.projection is not None:
            du = unproject(layer, du, branch.projection)
        return unpool(du, branch.input_pool)  # forward was: pool before the projection

    # z = BN(W_z y + b_z) + x
    dw = dzf
    if cache.bn is not None:
        bn_grads = batchnorm.backward(dzf, cache.bn)
        grads["bn.weight"], grads["bn.bias"] = bn_grads.dweight, bn_grads.dbias
        dw = bn_grads.dh
    dy = unproject("z", dw, cache.z)  # (B, C', N)
    if cache.chunked is None:
        dattention, dg = aggregate.backward(dy, cache.aggregate)  # y = g A^T
        # dattention is a new array made here: the variant may work in its memory
        pair_grads = variant.backward(dattention, cache.pairwise, **_handed_over(variant))
        del dattention
    else:
        pair_grads, dg = _chunked_attention_backward(dy, cache.chunked)
    grads.update(pair_grads.dextra)

    dx_theta = branch_backward("theta", pair_grads.dtheta, cache.theta)
    dx_phi = branch_backward("phi", pair_grads.dphi, cache.phi)  # Gaussian: phi = pool(x)
    dx_g = branch_backward("g", dg, cache.g)
    dx = dx_theta + dx_phi + dx_g + dzf  # x reaches z along four paths

    order = [n for n in param_shapes(cfg) if n in grads]
    return xp.reshape(dx, cache.input_shape), {n: grads[n] for n in order}


def _chunked_attention_backward(
    dy: Array, chunked: ChunkedAttentionCache
) -> tuple[PairwiseGrads, Array]:
    """Backward of the attention and of y = g Aᵀ, one block of queries at a time.

    Each block's attention is recomputed from θ and φ, then differentiated with the
    unchunked formulas; θ's gradient is the concatenation of the blocks', while φ, g and
    the variant's weights sum their blocks' gradients.
    """
    xp = namespace(dy)
    variant = get_pairwise(chunked.pairwise)
    dtheta_blocks = []
    dphi, dg, dextra = None, None, {}
    for start, stop in chunked.bounds():
        attention_rows, pairwise_cache = chunked.block(start, stop)  # recomputed
        aggregate_cache = aggregate.AggregateCache(attention=attention_rows, values=chunked.values)
        dattention_rows, dg_part = aggregate.backward(dy[:, :, start:stop], aggregate_cache)
        del attention_rows, aggregate_cache
        part = variant.backward(dattention_rows, pairwise_cache, **_handed_over(variant))
        del dattention_rows, pairwise_cache
        dtheta_blocks.append(part.dtheta)  # (B, C', stop - start)
        # sums over blocks, in place on the first block's arrays (made by the backward)
        if dphi is None:
            dphi, dg, dextra = part.dphi, dg_part, dict(part.dextra)
        else:
            dphi += part.dphi
            dg += dg_part
            for name, value in part.dextra.items():
                dextra[name] += value
    dtheta = xp.concat(dtheta_blocks, axis=2)  # (B, C', N)
    return PairwiseGrads(dtheta=dtheta, dphi=dphi, dextra=dextra), dg


def _handed_over(variant: Any) -> dict[str, bool]:
    """``{"overwrite_input": True}`` when the variant's backward accepts that keyword (it
    may then compute in the memory of the array the block made and hands over)."""
    return {"overwrite_input": True} if _accepts_overwrite(variant.backward) else {}


@functools.lru_cache(maxsize=64)
def _accepts_overwrite(function: Any) -> bool:
    try:
        return "overwrite_input" in inspect.signature(function).parameters
    except (TypeError, ValueError):  # no signature to read: hand nothing over
        return False


def _itemsize(xp: Any, dtype: Any) -> int:
    return 4 if dtype == xp.float32 else 8


def apply_buffer_updates(params: Mapping[str, Array], cache: BlockCache) -> dict[str, Array]:
    """Return a new params dict with the BN running statistics from ``cache`` applied.

    ``params`` itself is not modified. Without batch norm, or after an eval-mode forward,
    the result equals ``params``.
    """
    if not isinstance(cache, BlockCache):
        raise TypeError(
            f"cache must be the BlockCache returned by forward, got {type(cache).__name__}"
        )
    new = dict(params)
    new.update(cache.updated_buffers)
    return new


def _check_config(cfg: object) -> None:
    if not isinstance(cfg, NonLocalConfig):
        raise TypeError(f"cfg must be a NonLocalConfig, got {type(cfg).__name__}")


def _check_x(x: Array, cfg: NonLocalConfig) -> Any:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"x must be an array of shape (B, C, *S), got {type(x).__name__}")
    xp = namespace(x)
    shape = tuple(x.shape)
    expected = f"(B, C={cfg.in_channels}, *S) with 1 to 3 spatial dims"
    if not 3 <= len(shape) <= 5:
        raise ValueError(f"expected x of shape {expected}, got {len(shape)}-d shape {shape}")
    if shape[1] != cfg.in_channels:
        raise ValueError(
            f"expected x of shape {expected}, got {shape}: channel mismatch "
            f"({shape[1]} != cfg.in_channels={cfg.in_channels})"
        )
    if any(s == 0 for s in shape):
        raise ValueError(f"x must not be empty: got shape {shape}")
    if not xp.isdtype(x.dtype, "real floating") or x.dtype not in (xp.float32, xp.float64):
        raise TypeError(f"x must have a real floating dtype (float32 or float64), got {x.dtype}")
    spatial = shape[2:]
    if cfg.sub_sample is not None:
        if len(cfg.sub_sample) != len(spatial):
            raise ValueError(
                f"cfg.sub_sample={cfg.sub_sample} has {len(cfg.sub_sample)} entries but x has "
                f"{len(spatial)} spatial dims (S={spatial}); give one kernel size per dim"
            )
        too_big = [(k, s) for k, s in zip(cfg.sub_sample, spatial, strict=True) if k > s]
        if too_big:
            raise ValueError(
                f"cfg.sub_sample={cfg.sub_sample} is larger than the spatial size S={spatial}: "
                "pooling would leave zero key positions"
            )
    return xp


def _check_dz(dz: Array, cache: BlockCache) -> Any:
    if not hasattr(dz, "shape") or not hasattr(dz, "dtype"):
        raise TypeError(f"dz must be an array, got {type(dz).__name__}")
    xp = namespace(dz, cache.z.x)
    if tuple(dz.shape) != cache.input_shape:
        raise ValueError(f"dz must have the shape of z, {cache.input_shape}, got {tuple(dz.shape)}")
    if dz.dtype != cache.dtype:
        raise TypeError(f"dz must have the dtype of z, {cache.dtype}, got {dz.dtype}")
    return xp
