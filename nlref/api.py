"""``nlref.forward`` and ``nlref.backward``: the Non-local block at any size.

The block itself is :mod:`nlref.block`, the paper's steps as plain formulas. A problem too
large or too slow for them (an attention that does not fit in memory, worker threads)
goes to :mod:`nlref.engine`, which runs the same steps in tiles of queries and on threads
and is pinned to the reference by tests (bit for bit with one tile and one thread).
:func:`forward` asks the engine's memory plan which of the two runs; :func:`backward` sends
a cache back to whichever made it.
"""

from __future__ import annotations

from collections.abc import Mapping

from . import block, engine
from ._backend import Array
from .checks import check_config, check_forward, check_x
from .config import NonLocalConfig

__all__ = ["backward", "forward"]


def forward(
    x: Array,
    params: Mapping[str, Array],
    cfg: NonLocalConfig,
    training: bool = True,
    *,
    chunk_size: int | None = None,
    memory_limit: int | None = None,
    threads: int | None = None,
) -> tuple[Array, block.BlockCache | engine.EngineCache]:
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
    chunk_size : int or None
        Evaluate the attention in tiles of this many queries, and recompute each tile in
        the backward instead of caching the (B, N, N′) attention (exact). None: decided by
        the memory available (:func:`nlref.engine.plan`).
    memory_limit : int or None
        Bytes the block may use; None: what the system reports available.
    threads : int or None
        CPU threads for NumPy-backed arrays; None: every usable CPU for a large enough
        problem, else 1.

    Returns
    -------
    z : array, like x
    cache : nlref.block.BlockCache or nlref.engine.EngineCache
        ``cache.attention`` is A (B, N, N′) (the engine raises
        :class:`~nlref.engine.AttentionNotStoredError` when it never held all of it; then
        ``cache.attention_rows(start, stop)``); ``cache.updated_buffers`` the new BN
        running statistics. Neither x nor params is modified.

    Raises
    ------
    MemoryLimitError
        When even tiles of one query would not fit, before anything is allocated.
    """
    check_config(cfg)
    check_x(x, cfg)  # what the plan reads; the reference checks the rest itself
    plan = engine.plan(x, cfg, chunk_size=chunk_size, memory_limit=memory_limit, threads=threads)
    if not plan.uses_engine:  # one tile of all queries, one thread: the reference
        return block.forward(x, params, cfg, training)
    check_forward(x, params, cfg, training)
    return engine.forward(x, params, cfg, training, plan)


def backward(
    dz: Array, cache: block.BlockCache | engine.EngineCache
) -> tuple[Array, dict[str, Array]]:
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
    if isinstance(cache, engine.EngineCache):
        return engine.backward(dz, cache)
    return block.backward(dz, cache)
