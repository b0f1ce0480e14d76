"""The block at any size: the reference's steps, in runs of batch elements and tiles.

:func:`forward` and :func:`backward` compute what :func:`nlref.block.forward` and
:func:`nlref.block.backward` compute, with the block's own steps (``embed``, ``project``,
``normalise`` and their backward, in :mod:`nlref.block`) and, for attend + aggregate, the
tiles of :mod:`nlref.engine.tiles`:

- up to W_z y + b_z every batch element is on its own, so with B ≥ T threads each worker
  runs a run of batch elements through embed, attend, aggregate and W_z (one
  :class:`RunCache` per run); batch norm then joins them;
- with fewer batch elements than threads, one run holds the whole batch and its tiles go
  to the threads instead.

With one tile and one thread this is the reference, bit for bit (``tests/test_engine.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import block
from .._backend import Array, namespace
from ..checks import check_dz
from ..config import NonLocalConfig
from ..layers.batchnorm import BatchNormCache
from ..layers.projection import ProjectionCache
from ..pairwise import get as get_pairwise
from ..params import in_param_order
from . import tiles as tiles_
from .memory import AttentionNotStoredError, Plan
from .threads import region, run_split, split

__all__ = ["EngineCache", "RunCache", "backward", "forward"]


@dataclass(frozen=True)
class RunCache:
    """Everything before batch norm for the batch elements ``batch`` = [b₀, b₁)."""

    batch: tuple[int, int]
    embed_theta: block.EmbedCache
    embed_phi: block.EmbedCache
    embed_g: block.EmbedCache
    attention: tiles_.TiledAttention
    project_out: ProjectionCache


@dataclass(frozen=True)
class EngineCache:
    """What :func:`backward` needs, as :class:`nlref.block.BlockCache` for the reference.

    Attributes
    ----------
    cfg, training, input_shape, key_shape, dtype
    plan : Plan
        The tiles and threads (``plan.materialised``, ``plan.chunk_size``, ``plan.reason``).
    runs : tuple of RunCache
        The embeddings, the tiled attention and W_z of each run of batch elements.
    batch_norm : BatchNormCache or None
    updated_buffers : dict
        The new BN running statistics after a training-mode forward (see ``BlockCache``).
    """

    cfg: NonLocalConfig
    training: bool
    input_shape: tuple[int, ...]
    key_shape: tuple[int, ...]
    dtype: Any
    plan: Plan
    runs: tuple[RunCache, ...]
    batch_norm: BatchNormCache | None
    updated_buffers: dict[str, Array] = field(default_factory=dict)

    @property
    def threads(self) -> int:
        """CPU threads forward used, and backward uses."""
        return self.plan.threads

    @property
    def attention(self) -> Array:
        """The normalised pairwise weights f / C(x), of shape (B, N, N′).

        Raises
        ------
        AttentionNotStoredError
            (an ``AttributeError``) when the forward ran in tiles of queries and never held
            the whole array; the message says how to get it.
        """
        if not self.plan.materialised:
            b, _, *spatial = self.input_shape
            n, n_keys = math.prod(spatial), math.prod(self.key_shape)
            plan = self.plan
            raise AttentionNotStoredError(
                f"the attention (B, N, N′) = ({b}, {n}, {n_keys}) was not materialised: "
                f"forward evaluated the queries in {plan.n_tiles} tiles of "
                f"{plan.chunk_size} ({plan.reason}), and backward recomputes each tile. "
                "Use cache.attention_rows(start, stop) for a block of query rows, or run "
                f"forward(..., chunk_size={n}) to materialise all of it"
            )
        return tiles_.join([run.attention.attention() for run in self.runs], None)

    def attention_rows(self, start: int, stop: int) -> Array:
        """Rows ``start:stop`` of the attention, (B, stop − start, N′): a slice of the
        stored attention, or recomputed with the forward's formula (exact)."""
        n = math.prod(self.input_shape[2:])
        if not (0 <= start < stop <= n):
            raise ValueError(f"expected 0 <= start < stop <= N={n}, got start={start}, stop={stop}")
        return tiles_.join([run.attention.rows(start, stop) for run in self.runs], None)

    @property
    def values(self) -> Array:
        """g, the values of the attention, (B, C′, N′) (for the Gaussian too)."""
        return tiles_.join([run.attention.values for run in self.runs], None)


def forward(
    x: Array, params: Mapping[str, Array], cfg: NonLocalConfig, training: bool, plan: Plan
) -> tuple[Array, EngineCache]:
    """The block's forward with the tiles and threads of ``plan`` (arguments checked by
    :func:`nlref.forward`, which calls this)."""
    xp = namespace(x)
    b, c, *spatial = x.shape
    x_flat = xp.reshape(x, (b, c, math.prod(spatial)))  # (B, C, N)
    runs, inner_threads = _batch_runs(b, plan.threads)

    def forward_runs(batches: list[tuple[int, int]]) -> list[tuple[Array, RunCache]]:
        return [
            _forward_run(x_flat, batch, params, cfg, tuple(spatial), plan, inner_threads)
            for batch in batches
        ]

    with region(plan.threads):
        done = [item for r in run_split(forward_runs, runs, plan.threads) for item in r]
        h = tiles_.join([h_run for h_run, _ in done], None)  # (B, C, N): W_z y + b_z
        o, bn_cache, updated = block.normalise(h, params, cfg, training)
        z = o + x_flat  # the residual connection
    cache = EngineCache(
        cfg=cfg, training=training, input_shape=tuple(x.shape),
        key_shape=cfg.key_shape(spatial), dtype=x.dtype, plan=plan,
        runs=tuple(run for _, run in done), batch_norm=bn_cache, updated_buffers=updated,
    )  # fmt: skip
    return xp.reshape(z, tuple(x.shape)), cache


def _forward_run(
    x: Array,
    batch: tuple[int, int],
    params: Mapping[str, Array],
    cfg: NonLocalConfig,
    spatial: tuple[int, ...],
    plan: Plan,
    threads: int,
) -> tuple[Array, RunCache]:
    """Steps 1 to 4 (embed, attend, aggregate, W_z) for batch elements ``batch`` of x."""
    x_run = x[batch[0] : batch[1], ...]  # (b, C, N)
    theta, phi, g, (embed_theta, embed_phi, embed_g) = block.embed(x_run, params, cfg, spatial)
    variant = get_pairwise(cfg.pairwise)
    extra = {name: params[name] for name in variant.extra_params(cfg.inter_channels)}
    y, attention = tiles_.forward(
        theta, phi, g, extra, variant, cfg.effective_scale,
        chunk_size=plan.chunk_size, threads=threads,
    )  # fmt: skip
    h, project_out = block.project("z", y, params)  # (b, C, N)
    run = RunCache(batch, embed_theta, embed_phi, embed_g, attention, project_out)
    return h, run


def backward(dz: Array, cache: EngineCache) -> tuple[Array, dict[str, Array]]:
    """The block's backward for a forward the engine ran (called by
    :func:`nlref.backward`)."""
    like = cache.runs[0].attention.values
    xp = check_dz(dz, like, cache.input_shape, cache.dtype)
    b, c, *spatial = cache.input_shape
    dz_flat = xp.reshape(dz, (b, c, math.prod(spatial)))  # (B, C, N)
    grads: dict[str, Array] = {}
    parallel_runs = cache.threads if len(cache.runs) > 1 else 1

    with region(cache.threads):
        dh = block.normalise_backward(dz_flat, cache.batch_norm, grads)  # o = BN(h)

        def backward_runs(runs: list[RunCache]) -> list[tuple[Array, dict[str, Array]]]:
            return [_backward_run(dh, dz_flat, run) for run in runs]

        done = [
            item
            for part in run_split(backward_runs, list(cache.runs), parallel_runs)
            for item in part
        ]
        dx = tiles_.join([dx_run for dx_run, _ in done], None)
        for _, run_grads in done:  # in batch order: deterministic
            for name, value in run_grads.items():
                grads[name] = grads[name] + value if name in grads else value
    return xp.reshape(dx, cache.input_shape), in_param_order(grads, cache.cfg)


def _backward_run(dh: Array, dz: Array, run: RunCache) -> tuple[Array, dict[str, Array]]:
    """Backward of :func:`_forward_run`: x̄ of the run's batch elements along all four
    paths, and the run's share of the parameters' gradients."""
    b0, b1 = run.batch
    grads: dict[str, Array] = {}
    dy = block.unproject("z", dh[b0:b1, ...], run.project_out, grads)  # h = W_z y + b_z
    dtheta, dphi, dg, dextra = tiles_.backward(dy, run.attention)  # y = g Aᵀ, A = f / C(x)
    grads.update(dextra)
    caches = (run.embed_theta, run.embed_phi, run.embed_g)
    dx_theta, dx_phi, dx_g = block.embed_backward((dtheta, dphi, dg), caches, grads)
    return dz[b0:b1, ...] + dx_theta + dx_phi + dx_g, grads  # the four paths from x to z


def _batch_runs(batch: int, threads: int) -> tuple[list[tuple[int, int]], int]:
    """Runs of batch elements for the threads, and the threads left for each run's tiles:
    T runs of one thread each when B ≥ T, else one run of all T."""
    if threads > 1 and batch >= threads:
        return [(run[0], run[-1] + 1) for run in split(range(batch), threads)], 1
    return [(0, batch)], threads
