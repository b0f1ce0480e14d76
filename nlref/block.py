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
from dataclasses import dataclass, field, replace
from typing import Any

from ._backend import Array, namespace
from .config import NonLocalConfig
from .layers import aggregate, batchnorm, maxpool, projection
from .pairwise import PairwiseGrads
from .pairwise import get as get_pairwise
from .parallel import region, resolve_threads, run_split, split
from .params import check_params, param_shapes
from .perf import (
    AttentionNotStoredError,
    AttentionPlan,
    available_memory,
    chunk_memory,
    plan_attention,
)

__all__ = [
    "AttentionBlock",
    "AttentionCache",
    "BlockCache",
    "PartCache",
    "apply_buffer_updates",
    "backward",
    "forward",
]


@dataclass(frozen=True)
class BranchCache:
    """One branch: optional pool of x, optional projection, then optional pool."""

    input_pool: maxpool.MaxPoolCache | None  # pool before the projection (shared pool of x)
    projection: projection.ProjectionCache | None
    output_pool: maxpool.MaxPoolCache | None  # pool after the projection


@dataclass(frozen=True)
class AttentionBlock:
    """One block of the attention: batch elements ``batch`` = [b₀, b₁), query rows
    ``queries`` = [i₀, i₁).

    ``attention`` (b₁ − b₀, i₁ − i₀, N′) and the variant's cache ``pairwise`` are kept when
    the attention was materialised, and None when the backward recomputes the block. A
    recomputed block of a softmax variant keeps its rows' max and reciprocal sum instead
    (``softmax_rows``, O(rows)), so that the recomputation skips the row reductions and
    gives the forward's bits (:mod:`nlref.layers.softmax`).
    """

    batch: tuple[int, int]
    queries: tuple[int, int]
    attention: Array | None = None
    pairwise: Any = None
    softmax_rows: Any = None


@dataclass(frozen=True)
class AttentionCache:
    r"""The attention and y = g Aᵀ, evaluated block by block.

    Row i of batch element b of the attention depends on θ_{b,i} and on all of φ_b only
    (each pairwise function normalises one query row at a time), so for a block of batch
    elements β and of queries Q = [i₀, i₁)

    .. math::

        A_{β,Q} = f(\theta_{β,Q}, \phi_β) / C(x)_{β,Q},\qquad
        y_{β,Q} = g_β\,A_{β,Q}^\top,

    and the backward of a block is the unchunked backward applied to that block:

    .. math::

        \bar A_{β,Q} = \bar y_{β,Q}^\top g_β,\qquad
        \bar g_β = \sum_Q \bar y_{β,Q} A_{β,Q},\qquad
        (\bar\theta_{β,Q}, \bar\phi_{β,Q}, \bar w_{β,Q})
            = \text{variant.backward}(\bar A_{β,Q}),\qquad
        \bar\phi_β = \sum_Q \bar\phi_{β,Q}.

    When the attention is **materialised** each block keeps its attention and the
    variant's cache (one block for all of it, or, when its blocks are spread over T
    threads, each batch element's queries in ⌈T/B⌉ row ranges).
    When it is **chunked** the blocks are ``chunk_size`` query rows of every batch
    element, nothing of size N × N′ is kept, and the backward recomputes each block.

    B below is the batch run of the part this cache belongs to (:class:`PartCache`).

    Attributes
    ----------
    pairwise : str
        The variant's name.
    theta : array (B, C′, N)
    phi, values : arrays (B, C′, N′)
        φ and g (for the Gaussian, θ = x and φ = P(x), with C channels).
    extra : dict
        The variant's own weights (``concat.weight``).
    scale : float
    blocks : tuple of AttentionBlock
        In order: batch ranges ascending, and the query blocks of a batch range ascending.
    stored : bool
        Whether the blocks hold their attention (materialised) or are recomputed.
    threads : int
        Threads the blocks are spread over (:mod:`nlref.parallel`), forward and backward.
    """

    pairwise: str
    theta: Array
    phi: Array
    values: Array
    extra: dict[str, Array]
    scale: float
    blocks: tuple[AttentionBlock, ...]
    stored: bool
    threads: int = 1

    def evaluate(
        self,
        batch: tuple[int, int],
        queries: tuple[int, int],
        softmax_rows: Any = None,
    ) -> tuple[Array, Any]:
        """The attention of batch elements ``batch`` and query rows ``queries``,
        (b₁ − b₀, i₁ − i₀, N′), and the variant's cache, computed from θ and φ (without
        the row reductions when a softmax variant's ``softmax_rows`` are given)."""
        variant = get_pairwise(self.pairwise)
        (b0, b1), (i0, i1) = batch, queries
        theta_rows = self.theta[b0:b1, :, i0:i1]  # (b1 - b0, C', i1 - i0)
        phi = self.phi[b0:b1, ...]
        if softmax_rows is None:
            return variant.forward(theta_rows, phi, self.extra, self.scale)
        return variant.forward(theta_rows, phi, self.extra, self.scale, rows=softmax_rows)

    def attention(self) -> Array:
        """All of the stored attention, (B, N, N′): the one block itself, or the blocks
        joined (a copy)."""
        return _join([blk.attention for blk in self.blocks], self.blocks)


@dataclass(frozen=True)
class PartCache:
    """Everything before batch norm for the batch elements ``batch`` = [b₀, b₁).

    Up to W_z y + b_z, the block treats each batch element on its own, so
    :func:`forward` may run runs of batch elements on separate threads; batch norm then
    joins them.

    Attributes
    ----------
    batch : tuple of int
    theta, phi, g : BranchCache
        The query branch and the two key-side branches. A shared pool of x (pool before
        projection, and the Gaussian's φ = pool(x)) appears as ``input_pool``.
    attention_cache : AttentionCache
        θ, φ, g, the variant's weights and the blocks the attention was evaluated in (with
        their attention and variant caches when it was materialised).
    z : ProjectionCache
        The cache of W_z y + b_z.
    """

    batch: tuple[int, int]
    theta: BranchCache
    phi: BranchCache
    g: BranchCache
    attention_cache: AttentionCache
    z: projection.ProjectionCache


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
    parts : tuple of PartCache
        The branches, the attention and W_z y of each run of batch elements: one part for
        the whole batch, or one per thread when the batch was split over threads.
    bn : BatchNormCache or None
    updated_buffers : dict
        ``{"bn.running_mean": ..., "bn.running_var": ...}`` after a training-mode forward
        with batch norm (PyTorch's update, unbiased variance, momentum ``cfg.bn_momentum``);
        empty otherwise. ``forward`` never mutates ``params``: apply these yourself, or call
        :func:`apply_buffer_updates`.
    plan : AttentionPlan or None
        How the attention was evaluated: all queries at once (``plan.materialised``) or in
        ``plan.n_chunks`` blocks of ``plan.chunk_size`` queries, and why.
    threads : int
        CPU threads forward used, and backward uses (:mod:`nlref.parallel`).
    """

    cfg: NonLocalConfig
    training: bool
    input_shape: tuple[int, ...]
    key_shape: tuple[int, ...]
    dtype: Any
    parts: tuple[PartCache, ...]
    bn: batchnorm.BatchNormCache | None
    updated_buffers: dict[str, Array] = field(default_factory=dict)
    plan: AttentionPlan | None = None
    threads: int = 1

    @property
    def attention(self) -> Array:
        """The normalised pairwise weights f / C(x), of shape (B, N, N′).

        Raises
        ------
        AttentionNotStoredError
            (an ``AttributeError``) when the forward ran in chunks of queries and never held
            the whole array; the message says how to get it.
        """
        if not self.plan.materialised:
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
        return _join([part.attention_cache.attention() for part in self.parts], None)

    def attention_rows(self, start: int, stop: int) -> Array:
        """Rows ``start:stop`` of the attention, shape (B, stop − start, N′).

        A slice of the cached attention when it was materialised in one block; otherwise
        recomputed from θ and φ with the same formula as the forward (exact, like the chunks
        themselves).
        """
        n = math.prod(self.input_shape[2:])
        if not (0 <= start < stop <= n):
            raise ValueError(f"expected 0 <= start < stop <= N={n}, got start={start}, stop={stop}")
        rows = []
        for part in self.parts:
            core = part.attention_cache
            if core.stored and len(core.blocks) == 1:
                rows.append(core.blocks[0].attention[:, start:stop, :])
            else:
                rows.append(core.evaluate((0, part.batch[1] - part.batch[0]), (start, stop))[0])
        return _join(rows, None)

    @property
    def values(self) -> Array:
        """g, the values of the attention, (B, C′, N′) (for the Gaussian too)."""
        return _join([part.attention_cache.values for part in self.parts], None)


def forward(
    x: Array,
    params: Mapping[str, Array],
    cfg: NonLocalConfig,
    training: bool = True,
    *,
    chunk_size: int | None = None,
    memory_limit: int | None = None,
    threads: int | None = None,
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
    threads : int or None
        CPU threads, forward and backward (:mod:`nlref.parallel`): runs of batch elements
        go to separate threads when B ≥ threads, else the blocks of the attention do; BLAS
        runs one thread per worker meanwhile. None: every usable CPU for NumPy arrays whose
        attention has at least :data:`nlref.parallel.MIN_PARALLEL_ELEMENTS` elements, else
        1. CuPy arrays run on the calling thread (``threads`` > 1 is an error there). The
        results equal the one-thread results up to the order of a few float sums.

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
    b, c, *spatial = x.shape
    spatial = tuple(spatial)
    kernel = cfg.sub_sample
    key_shape = spatial if kernel is None else maxpool.output_size(spatial, kernel)
    if memory_limit is not None and (isinstance(memory_limit, bool) or memory_limit < 1):
        raise ValueError(f"memory_limit must be None or a positive int, got {memory_limit!r}")
    n, n_keys = math.prod(spatial), math.prod(key_shape)
    threads = resolve_threads(threads, x, b * n * n_keys)
    plan = plan_attention(
        tuple(x.shape),
        n_keys,
        cfg.inter_channels,
        _itemsize(xp, x.dtype),
        chunk_size=chunk_size,
        available=available_memory(x) if memory_limit is None else int(memory_limit),
        block_bytes=chunk_memory(x),
        # T threads hold T blocks at once, except when each holds its own run of the batch
        concurrent=1 if b >= threads else threads,
    )
    if b < threads:
        threads = min(threads, plan.concurrent)
    xf = xp.reshape(x, (b, c, n))  # (B, C, N)
    batch_runs, inner_threads = _batch_runs(b, threads)

    def forward_runs(runs: list[tuple[int, int]]) -> list[tuple[Array, PartCache]]:
        return [_forward_part(xf, run, params, cfg, spatial, plan, inner_threads) for run in runs]

    with region(threads):
        done = [item for r in run_split(forward_runs, batch_runs, threads) for item in r]
        w = _join([w_part for w_part, _ in done], None)  # (B, C, N): W_z y + b_z
        parts = tuple(part for _, part in done)
        del done

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
        parts=parts,
        bn=bn_cache,
        updated_buffers=updated,
        plan=plan,
        threads=threads,
    )
    return z, cache


def _forward_part(
    x: Array,
    batch: tuple[int, int],
    params: Mapping[str, Array],
    cfg: NonLocalConfig,
    spatial: tuple[int, ...],
    plan: AttentionPlan,
    threads: int,
) -> tuple[Array, PartCache]:
    """Everything before batch norm, W_z y + b_z (b₁ − b₀, C, N), for batch elements
    ``batch`` = [b₀, b₁) of x (B, C, N)."""
    xp = namespace(x)
    variant = get_pairwise(cfg.pairwise)
    xf = x[batch[0] : batch[1], ...]  # (b, C, N)
    b = xf.shape[0]
    kernel = cfg.sub_sample

    def project(layer: str, inp: Array) -> tuple[Array, projection.ProjectionCache]:
        return projection.forward(inp, params[f"{layer}.weight"], params.get(f"{layer}.bias"))

    def pool(u: Array) -> tuple[Array, maxpool.MaxPoolCache]:  # (b, C*, N) -> (b, C*, N')
        out, pool_cache = maxpool.forward(xp.reshape(u, (b, u.shape[1], *spatial)), kernel)
        return xp.reshape(out, (b, u.shape[1], -1)), pool_cache

    before = kernel is not None and cfg.pool_order == "before_projection"
    pooled_x, pool_x = None, None
    if kernel is not None and (before or not variant.embeds):
        pooled_x, pool_x = pool(xf)  # (b, C, N')

    def key_branch(layer: str) -> tuple[Array, BranchCache]:
        u, proj_cache = project(layer, pooled_x if before else xf)
        pool_cache = None
        if kernel is not None and not before:
            u, pool_cache = pool(u)
        input_pool = pool_x if before else None
        return u, BranchCache(input_pool=input_pool, projection=proj_cache, output_pool=pool_cache)

    # queries theta (b, C', N) and keys phi (b, C', N'); the Gaussian compares x itself
    if variant.embeds:
        theta, theta_proj = project("theta", xf)
        theta_cache = BranchCache(input_pool=None, projection=theta_proj, output_pool=None)
        phi, phi_cache = key_branch("phi")
    else:
        theta, theta_cache = xf, BranchCache(input_pool=None, projection=None, output_pool=None)
        phi = xf if pooled_x is None else pooled_x
        phi_cache = BranchCache(input_pool=pool_x, projection=None, output_pool=None)
    g, g_cache = key_branch("g")  # values (b, C', N')

    extra = {name: params[name] for name in variant.extra_params(cfg.inter_channels)}
    blocks = _plan_blocks(b, xf.shape[2], plan, threads)
    core = AttentionCache(
        pairwise=cfg.pairwise,
        theta=theta,
        phi=phi,
        values=g,
        extra=extra,
        scale=cfg.effective_scale,
        blocks=tuple(blocks),
        stored=plan.materialised,
        threads=threads,
    )

    def forward_run(run: list[AttentionBlock]) -> list[tuple[Array, AttentionBlock]]:
        done = []
        for blk in run:
            attention, pairwise_cache = core.evaluate(blk.batch, blk.queries)
            values = g[blk.batch[0] : blk.batch[1], ...]
            y_block, _ = aggregate.forward(attention, values)  # (b1 - b0, C', i1 - i0)
            if core.stored:
                blk = replace(blk, attention=attention, pairwise=pairwise_cache)
            elif variant.softmax:  # O(rows): the backward recomputes without row reductions
                blk = replace(blk, softmax_rows=pairwise_cache.rows)
            del attention, pairwise_cache  # kept by blk when materialised
            done.append((y_block, blk))
        return done

    done = [item for run in run_split(forward_run, blocks, threads) for item in run]
    core = replace(core, blocks=tuple(blk for _, blk in done))
    y = _join([y_block for y_block, _ in done], core.blocks, query_axis=2)  # (b, C', N)
    del done
    w, z_cache = project("z", y)  # (b, C, N)
    part = PartCache(
        batch=batch, theta=theta_cache, phi=phi_cache, g=g_cache, attention_cache=core, z=z_cache
    )
    return w, part


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
    b, c, *spatial = cache.input_shape
    dzf = xp.reshape(dz, (b, c, math.prod(spatial)))  # (B, C, N)
    grads: dict[str, Array] = {}
    parallel_parts = cache.threads if len(cache.parts) > 1 else 1

    with region(cache.threads):
        # z = BN(W_z y + b_z) + x
        dw = dzf
        if cache.bn is not None:
            bn_grads = batchnorm.backward(dzf, cache.bn)
            grads["bn.weight"], grads["bn.bias"] = bn_grads.dweight, bn_grads.dbias
            dw = bn_grads.dh

        def backward_parts(parts: list[PartCache]) -> list[tuple[Array, dict[str, Array]]]:
            return [_backward_part(dw, dzf, part, cache) for part in parts]

        done = [
            item
            for run in run_split(backward_parts, list(cache.parts), parallel_parts)
            for item in run
        ]
        dx = _join([dx_part for dx_part, _ in done], None)
        sums: dict = {}
        for _, part_grads in done:  # in batch order: deterministic
            _accumulate(sums, "grads", part_grads)
        grads.update(sums["grads"])

    order = [name for name in param_shapes(cfg) if name in grads]
    return xp.reshape(dx, cache.input_shape), {name: grads[name] for name in order}


def _backward_part(
    dw: Array, dz: Array, part: PartCache, cache: BlockCache
) -> tuple[Array, dict[str, Array]]:
    """Backward of :func:`_forward_part` for its batch elements: the gradient of x along
    all four paths (θ, φ, g and the residual ``dz``), and of the part's parameters."""
    xp = namespace(dw)
    b0, b1 = part.batch
    b = b1 - b0
    dw, dzf = dw[b0:b1, ...], dz[b0:b1, ...]
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

    dy = unproject("z", dw, part.z)  # (b, C', N)
    pair_grads, dg = _attention_backward(dy, part.attention_cache)
    grads.update(pair_grads.dextra)

    dx_theta = branch_backward("theta", pair_grads.dtheta, part.theta)
    dx_phi = branch_backward("phi", pair_grads.dphi, part.phi)  # Gaussian: phi = pool(x)
    dx_g = branch_backward("g", dg, part.g)
    dx = dzf + dx_theta  # x reaches z along four paths: the residual, θ, φ and g
    dx += dx_phi  # in place: dx is the new array made on the line above
    dx += dx_g
    return dx, grads


def _batch_runs(batch: int, threads: int) -> tuple[list[tuple[int, int]], int]:
    """Runs of batch elements for the threads, and the threads left for each run's
    attention blocks: T runs of one thread each when B ≥ T, else one run of all T."""
    if threads > 1 and batch >= threads:
        return [(run[0], run[-1] + 1) for run in split(range(batch), threads)], 1
    return [(0, batch)], threads


def _attention_backward(dy: Array, core: AttentionCache) -> tuple[PairwiseGrads, Array]:
    """Backward of the attention and of y = g Aᵀ, block by block (see
    :class:`AttentionCache`).

    Each block's attention is the stored one or is recomputed from θ and φ, then
    differentiated with the unchunked formulas. θ's gradient is the blocks' joined; φ, g
    and the variant's weights sum their blocks' gradients (in block order on each thread,
    then the threads' sums in thread order: the result does not depend on scheduling).
    """
    variant = get_pairwise(core.pairwise)
    handed_over = _handed_over(variant)

    def backward_run(run: list[AttentionBlock]) -> tuple[list[Array], dict]:
        dtheta_blocks, sums = [], {}  # sums: batch range -> (dphi, dg); "extra" -> dextra
        for blk in run:
            (b0, b1), (i0, i1) = blk.batch, blk.queries
            if core.stored:
                attention, pairwise_cache = blk.attention, blk.pairwise
            else:
                attention, pairwise_cache = core.evaluate(blk.batch, blk.queries, blk.softmax_rows)
            values = core.values[b0:b1, ...]
            aggregate_cache = aggregate.AggregateCache(attention=attention, values=values)
            dattention, dg_part = aggregate.backward(dy[b0:b1, :, i0:i1], aggregate_cache)
            del attention, aggregate_cache
            # dattention is a new array made here: the variant may work in its memory
            part = variant.backward(dattention, pairwise_cache, **handed_over)
            del dattention, pairwise_cache
            dtheta_blocks.append(part.dtheta)  # (b1 - b0, C', i1 - i0)
            _accumulate(sums, blk.batch, (part.dphi, dg_part))
            _accumulate(sums, "extra", part.dextra)
        return dtheta_blocks, sums

    runs = run_split(backward_run, list(core.blocks), core.threads)
    dtheta = _join([d for blocks, _ in runs for d in blocks], core.blocks, query_axis=2)
    sums: dict = {}
    for _, run_sums in runs:  # in run order: deterministic
        for key, value in run_sums.items():
            _accumulate(sums, key, value)
    batches = list(dict.fromkeys(blk.batch for blk in core.blocks))  # ascending
    dphi = _join([sums[batch][0] for batch in batches], None)
    dg = _join([sums[batch][1] for batch in batches], None)
    return PairwiseGrads(dtheta=dtheta, dphi=dphi, dextra=sums.get("extra", {})), dg


def _accumulate(sums: dict, key: Any, value: Any) -> None:
    """``sums[key] += value`` for an array, a tuple or a dict of arrays; in place on the
    first value stored (arrays the backward made itself)."""
    if key not in sums:
        sums[key] = dict(value) if isinstance(value, dict) else value
        return
    held = sums[key]
    if isinstance(value, dict):
        for name, array in value.items():
            held[name] += array
    elif isinstance(value, tuple):
        for total, array in zip(held, value, strict=True):
            total += array
    else:
        held += value


def _plan_blocks(batch: int, n: int, plan: AttentionPlan, threads: int) -> list[AttentionBlock]:
    """The blocks the attention is evaluated in.

    Chunked: ``plan.chunk_size`` query rows of every batch element per block. Materialised:
    one block; with T > B threads (:func:`forward` gives a part more than one thread only
    then), every batch element split into ⌈T / B⌉ ranges of queries.
    """
    if not plan.materialised:
        k = plan.chunk_size
        return [AttentionBlock((0, batch), (i, min(i + k, n))) for i in range(0, n, k)]
    parts = min(n, -(-threads // batch))  # T > B only: forward splits the batch otherwise
    if parts == 1:
        return [AttentionBlock((0, batch), (0, n))]
    rows = [(n * p // parts, n * (p + 1) // parts) for p in range(parts)]
    return [AttentionBlock((b, b + 1), q) for b in range(batch) for q in rows]


def _join(arrays: list[Array], blocks: Any, query_axis: int = 1) -> Array:
    """Join per-block arrays: along ``query_axis`` within a batch range, then along the
    batch axis (``blocks=None``: the arrays are per batch range already). One array is
    returned as it is."""
    if len(arrays) == 1:
        return arrays[0]
    xp = namespace(*arrays)
    if blocks is None:
        return xp.concat(arrays, axis=0)
    groups: dict[tuple[int, int], list[Array]] = {}
    for array, blk in zip(arrays, blocks, strict=True):
        groups.setdefault(blk.batch, []).append(array)
    joined = [g[0] if len(g) == 1 else xp.concat(g, axis=query_axis) for g in groups.values()]
    return joined[0] if len(joined) == 1 else xp.concat(joined, axis=0)


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
    xp = namespace(dz, cache.parts[0].z.x)
    if tuple(dz.shape) != cache.input_shape:
        raise ValueError(f"dz must have the shape of z, {cache.input_shape}, got {tuple(dz.shape)}")
    if dz.dtype != cache.dtype:
        raise TypeError(f"dz must have the dtype of z, {cache.dtype}, got {dz.dtype}")
    return xp
