r"""Steps 2 and 3 of the block, attend and aggregate, tile by tile.

Row i of batch element b of the attention depends on θ_{b,i} and on all of φ_b only (each
pairwise function normalises one query row at a time), so for a tile of batch elements β
and queries Q = [i₀, i₁)

.. math::

    A_{β,Q} = f(\theta_{β,Q}, \phi_β) / C(x)_{β,Q},\qquad y_{β,Q} = g_β\,A_{β,Q}^\top,

and the backward of a tile is the block's backward applied to that tile:

.. math::

    \bar A_{β,Q} = \bar y_{β,Q}^\top g_β,\qquad
    \bar g_β = \sum_Q \bar y_{β,Q} A_{β,Q},\qquad
    (\bar\theta_{β,Q}, \bar\phi_{β,Q}, \bar w_{β,Q})
        = \text{variant.backward}(\bar A_{β,Q}),\qquad
    \bar\phi_β = \sum_Q \bar\phi_{β,Q}.

The formulas are the variant's and the layers' own (:mod:`nlref.pairwise`,
:mod:`nlref.layers.aggregate`); for a softmax variant the engine runs the variant's logits
step and then the softmax in place (:mod:`nlref.engine.inplace`).

When the attention is **materialised**, each tile keeps its attention and its state (the
variant's cache): one tile for all of it, or, when its tiles are spread over T threads,
each batch element's queries in ⌈T/B⌉ row ranges. When it is **tiled**, the tiles are
``chunk_size`` query rows of every batch element, nothing of size N × N′ is kept, and the
backward recomputes each tile (a softmax variant from its row statistics, O(rows)).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .._backend import Array, namespace
from ..layers import aggregate
from ..pairwise import Pairwise, PairwiseGrads
from . import inplace
from .threads import run_split

__all__ = ["Tile", "TiledAttention", "backward", "forward", "layout"]


@dataclass(frozen=True)
class Tile:
    """Batch elements ``batch`` = [b₀, b₁) and query rows ``queries`` = [i₀, i₁).

    ``attention`` (b₁ − b₀, i₁ − i₀, N′) and ``state`` (what the backward needs: the
    variant's cache, or for a softmax variant the logits' cache and the row statistics)
    are kept when the attention was materialised. A recomputed tile of a softmax variant
    keeps only its row statistics in ``state``; other recomputed tiles keep nothing.
    """

    batch: tuple[int, int]
    queries: tuple[int, int]
    attention: Array | None = None
    state: Any = None


@dataclass(frozen=True)
class TiledAttention:
    """The attention and y = g Aᵀ of one run of batch elements, evaluated tile by tile.

    Attributes
    ----------
    variant : Pairwise
    theta : array (B, C′, N)
    phi, values : arrays (B, C′, N′)
        φ and g (for the Gaussian, θ = x and φ = P(x), with C channels).
    extra : dict
        The variant's own weights (``concat.weight``).
    scale : float
    tiles : tuple of Tile
        In order: batch ranges ascending, and the query tiles of a batch range ascending.
    stored : bool
        Whether the tiles hold their attention (materialised) or are recomputed.
    threads : int
        Threads the tiles are spread over, forward and backward.
    """

    variant: Pairwise
    theta: Array
    phi: Array
    values: Array
    extra: Mapping[str, Array]
    scale: float
    tiles: tuple[Tile, ...]
    stored: bool
    threads: int = 1

    def evaluate(
        self, batch: tuple[int, int], queries: tuple[int, int], stats: Any = None
    ) -> tuple[Array, Any]:
        """The attention of batch elements ``batch`` and query rows ``queries``,
        (b₁ − b₀, i₁ − i₀, N′), and its state; given a softmax variant's row ``stats``,
        without the row reductions (same bits)."""
        (b0, b1), (i0, i1) = batch, queries
        theta = self.theta[b0:b1, :, i0:i1]  # (b1 - b0, C', i1 - i0)
        phi = self.phi[b0:b1, ...]
        if not self.variant.softmax:  # A = f(θ, φ) / C(x), the variant's own formula
            return self.variant.forward(theta, phi, self.extra, self.scale)
        # s = logits(θ, φ); A = softmax(s) = exp(s − m) r with m, r the rows' max and
        # reciprocal sum, in s's memory (s is ours), or from the given row statistics
        s, logits_cache = self.variant.logits.forward(theta, phi, self.extra, self.scale)
        attention, stats = inplace.softmax_forward(s, stats)
        return attention, (logits_cache, stats)

    def attention(self) -> Array:
        """All of the stored attention, (B, N, N′): the one tile itself, or the tiles
        joined (a copy)."""
        return join([tile.attention for tile in self.tiles], self.tiles)

    def rows(self, start: int, stop: int) -> Array:
        """Rows ``start:stop`` of the attention (B, stop − start, N′), sliced from the one
        stored tile or recomputed."""
        if self.stored and len(self.tiles) == 1:
            return self.tiles[0].attention[:, start:stop, :]
        return self.evaluate((0, self.theta.shape[0]), (start, stop))[0]


def layout(batch: int, n: int, chunk_size: int | None, threads: int) -> list[Tile]:
    """The tiles: ``chunk_size`` query rows of every batch element each when tiled; when
    materialised, one tile, or with T > B threads every batch element split into ⌈T / B⌉
    ranges of queries."""
    if chunk_size is not None:
        k = chunk_size
        return [Tile((0, batch), (i, min(i + k, n))) for i in range(0, n, k)]
    parts = min(n, -(-threads // batch))
    if parts == 1:
        return [Tile((0, batch), (0, n))]
    rows = [(n * p // parts, n * (p + 1) // parts) for p in range(parts)]
    return [Tile((b, b + 1), q) for b in range(batch) for q in rows]


def forward(
    theta: Array,
    phi: Array,
    values: Array,
    extra: Mapping[str, Array],
    variant: Pairwise,
    scale: float,
    *,
    chunk_size: int | None,
    threads: int,
) -> tuple[Array, TiledAttention]:
    """y = g Aᵀ (B, C′, N) with A = f(θ, φ) / C(x), tile by tile on ``threads`` threads."""
    tiles = layout(theta.shape[0], theta.shape[2], chunk_size, threads)
    cache = TiledAttention(
        variant=variant, theta=theta, phi=phi, values=values, extra=extra, scale=scale,
        tiles=tuple(tiles), stored=chunk_size is None, threads=threads,
    )  # fmt: skip

    def forward_run(run: list[Tile]) -> list[tuple[Array, Tile]]:
        done = []
        for tile in run:
            b0, b1 = tile.batch
            # A_{β,Q} = f(θ_{β,Q}, φ_β) / C(x)_{β,Q}                       (b, |Q|, N')
            attention, state = cache.evaluate(tile.batch, tile.queries)
            # y_{β,Q} = g_β A_{β,Q}ᵀ                                         (b, C', |Q|)
            y_tile, _ = aggregate.forward(attention, values[b0:b1, ...])
            if cache.stored:
                tile = replace(tile, attention=attention, state=state)
            elif variant.softmax:  # O(rows): the backward recomputes without row reductions
                tile = replace(tile, state=state[1])
            done.append((y_tile, tile))
        return done

    done = [item for run in run_split(forward_run, tiles, threads) for item in run]
    cache = replace(cache, tiles=tuple(tile for _, tile in done))
    y = join([y_tile for y_tile, _ in done], cache.tiles, query_axis=2)  # (B, C', N)
    return y, cache


def backward(dy: Array, cache: TiledAttention) -> tuple[Array, Array, Array, dict[str, Array]]:
    """Backward of :func:`forward`: θ̄ (B, C′, N), φ̄ and ḡ (B, C′, N′), and the gradients of
    the variant's own weights. θ̄ joins the tiles'; φ̄, ḡ and the weights' gradients sum
    them, in tile order on each thread, then the threads' sums in thread order: the result
    does not depend on scheduling."""
    variant = cache.variant

    def backward_run(run: list[Tile]) -> tuple[list[Array], dict[Any, Any]]:
        dtheta_tiles, sums = [], {}  # batch range -> {"dphi", "dg"}; "extra" -> dextra
        for tile in run:
            (b0, b1), (i0, i1) = tile.batch, tile.queries
            if cache.stored:
                attention, state = tile.attention, tile.state
            else:  # A_{β,Q} again, from θ_{β,Q} and φ_β (and a softmax's row statistics)
                attention, state = cache.evaluate(tile.batch, tile.queries, tile.state)
            values = cache.values[b0:b1, ...]
            aggregate_cache = aggregate.AggregateCache(attention=attention, values=values)
            # Ā_{β,Q} = ȳ_{β,Q}ᵀ g_β,  ḡ_β += ȳ_{β,Q} A_{β,Q}
            dattention, dg = aggregate.backward(dy[b0:b1, :, i0:i1], aggregate_cache)
            if variant.softmax:  # s̄ = (Ā − Σⱼ ĀᵢⱼAᵢⱼ) ⊙ A, in Ā's memory (ours)
                logits_cache, _ = state
                ds = inplace.softmax_backward(dattention, attention)
                grads: PairwiseGrads = variant.logits.backward(ds, logits_cache)
            else:  # (θ̄_{β,Q}, φ̄_{β,Q}, w̄) = variant.backward(Ā_{β,Q})
                grads = variant.backward(dattention, state)
            dtheta_tiles.append(grads.dtheta)  # (b1 - b0, C', i1 - i0)
            _accumulate(sums, tile.batch, {"dphi": grads.dphi, "dg": dg})
            _accumulate(sums, "extra", grads.dextra)
        return dtheta_tiles, sums

    runs = run_split(backward_run, list(cache.tiles), cache.threads)
    dtheta = join([d for tiles, _ in runs for d in tiles], cache.tiles, query_axis=2)
    sums: dict[Any, Any] = {}
    for _, run_sums in runs:  # in run order: deterministic
        for key, value in run_sums.items():
            _accumulate(sums, key, value)
    batches = list(dict.fromkeys(tile.batch for tile in cache.tiles))  # ascending
    dphi = join([sums[batch]["dphi"] for batch in batches], None)
    dg = join([sums[batch]["dg"] for batch in batches], None)
    return dtheta, dphi, dg, sums.get("extra", {})


def _accumulate(sums: dict[Any, Any], key: Any, value: Any) -> None:
    """``sums[key] += value`` for an array or a (nested) dict of arrays. On NumPy and CuPy
    the first value is copied (a variant's gradient may be any array) and the later ones
    are added in place into that copy; other arrays are added out of place."""
    if isinstance(value, dict):
        held = sums.setdefault(key, {})
        for name, array in value.items():
            _accumulate(held, name, array)
    elif key not in sums:
        sums[key] = _copy(value) if inplace.owns_memory(value) else value
    elif inplace.owns_memory(sums[key]):
        sums[key] += value
    else:
        sums[key] = sums[key] + value


def _copy(a: Array) -> Array:
    return namespace(a).asarray(a, copy=True)


def join(arrays: list[Array], tiles: Any, query_axis: int = 1) -> Array:
    """Join per-tile arrays: along ``query_axis`` within a batch range, then along the
    batch axis (``tiles=None``: the arrays are per batch range already). One array is
    returned as it is."""
    if len(arrays) == 1:
        return arrays[0]
    xp = namespace(*arrays)
    if tiles is None:
        return xp.concat(arrays, axis=0)
    groups: dict[tuple[int, int], list[Array]] = {}
    for array, tile in zip(arrays, tiles, strict=True):
        groups.setdefault(tile.batch, []).append(array)
    joined = [g[0] if len(g) == 1 else xp.concat(g, axis=query_axis) for g in groups.values()]
    return joined[0] if len(joined) == 1 else xp.concat(joined, axis=0)
