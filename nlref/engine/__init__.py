"""The engine: the Non-local block at any size, exactly, and fast.

:mod:`nlref.block` is the reference: the block's steps as plain formulas. The engine runs
those same steps when a problem is too large or too slow for them, and is pinned to the
reference by tests (bit for bit with one tile and one thread; to float rounding
otherwise). :func:`nlref.forward` hands a problem over when :func:`plan` says so:

- :mod:`~nlref.engine.memory`: the memory plan. How many queries per tile, so that the
  (B, N, N′) attention never has to exist at once (``chunk_size``, automatic above
  :data:`~nlref.engine.memory.ATTENTION_MEMORY_LIMIT` on the host, or when memory is short);
  :class:`MemoryLimitError` before anything is allocated.
- :mod:`~nlref.engine.tiles`: attend and aggregate tile by tile, and the backward that
  recomputes each tile instead of caching it (:class:`AttentionNotStoredError`,
  ``cache.attention_rows``).
- :mod:`~nlref.engine.threads`: runs of batch elements or of tiles on CPU worker threads,
  with BLAS held at one thread per worker and workers bound to CPUs.
- :mod:`~nlref.engine.inplace`: the softmax in place, on NumPy and CuPy arrays the engine
  made itself.
- :mod:`~nlref.engine.run`: the block's forward and backward over runs and tiles.
- :mod:`~nlref.engine.cost`: the FLOP model (``nlref bench``).
"""

from __future__ import annotations

from . import cost, inplace, memory, threads, tiles
from .memory import (
    ATTENTION_MEMORY_LIMIT,
    CHUNK_MEMORY,
    CHUNK_MEMORY_GPU,
    AttentionNotStoredError,
    MemoryLimitError,
    Plan,
    plan,
)
from .run import EngineCache, RunCache, backward, forward

__all__ = [
    "ATTENTION_MEMORY_LIMIT",
    "CHUNK_MEMORY",
    "CHUNK_MEMORY_GPU",
    "AttentionNotStoredError",
    "EngineCache",
    "MemoryLimitError",
    "Plan",
    "RunCache",
    "backward",
    "cost",
    "forward",
    "inplace",
    "memory",
    "plan",
    "threads",
    "tiles",
]
