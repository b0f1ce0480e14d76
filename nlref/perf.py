r"""The cost model of the Non-local block, and how much of the attention to hold at once.

Shapes: x (B, C, \*S) with N = prod(S) query positions, N′ key positions after pooling,
C′ inner channels; the pairwise inner product runs over :math:`C_f` channels, which is C′
for the embedded variants and C for the Gaussian (θ = x, φ = P(x)).

Attention memory and chunking
-----------------------------
The attention A = f / C(x) is a (B, N, N′) array: at N = N′ = 16,384 it is 1 GiB in
float32, before the temporaries of the softmax and of the backward. Every pairwise function
is a function of one query row at a time (the softmax normalises each row on its own; the
dot product and the concatenation divide by the constant N′), so the rows of A, and the
rows of y = g Aᵀ, can be computed in blocks of queries, exactly:

.. math::

    A_{[i_0, i_1)} = \frac{f(\theta_{[i_0, i_1)}, \phi)}{C(x)_{[i_0, i_1)}},\qquad
    y_{[i_0, i_1)} = g\, A_{[i_0, i_1)}^\top.

:func:`nlref.forward` does this when asked (``chunk_size=k``), or by itself when the
attention would need more than :data:`ATTENTION_MEMORY_LIMIT` bytes. The backward pass then
recomputes each block from θ, φ and g (one more θᵀφ product per block) instead of caching
the (B, N, N′) array; each block's backward is the same hand-derived formula as the
unchunked one, and the gradients of φ, g and the variant's own weights are sums over
blocks.

:func:`plan_attention` chooses between the two and refuses, before anything is allocated,
a problem whose smallest chunked evaluation would not fit in the memory available
(:class:`MemoryLimitError`).

GEMM FLOPs
----------
:func:`gemm_flops` counts the multiply-adds of the matrix products (2 FLOPs each) of the
forward and backward passes, as PyTorch runs them too; elementwise work (softmax, batch
norm, max-pool) is not counted. See ``docs/performance.md`` for the table per variant.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import array_api_compat

from .config import NonLocalConfig

__all__ = [
    "ATTENTION_MEMORY_LIMIT",
    "CHUNK_MEMORY",
    "CHUNK_MEMORY_GPU",
    "AttentionNotStoredError",
    "AttentionPlan",
    "MemoryLimitError",
    "available_memory",
    "chunk_memory",
    "gemm_flops",
    "plan_attention",
]

#: Bytes of the (B, N, N′) attention above which :func:`nlref.forward` evaluates the
#: queries in chunks by itself (``chunk_size=None``). 256 MiB: N = N′ = 8,192 at B = 1 in
#: float32 is materialised, N = N′ = 16,384 is not.
ATTENTION_MEMORY_LIMIT = 256 * 2**20

#: Target bytes of one (B, k, N′) block of the attention when chunking automatically on
#: the CPU: 8 MiB keeps a block and its temporaries in a CPU's last-level cache.
CHUNK_MEMORY = 8 * 2**20

#: The same on a GPU (CuPy arrays), where fewer, larger blocks keep the device busy.
CHUNK_MEMORY_GPU = 256 * 2**20

#: Arrays of the size of one attention block alive at once (the block, the temporaries of
#: the softmax, and in the backward its gradient): the working set is this many blocks.
BLOCK_ARRAYS = 4


class MemoryLimitError(MemoryError):
    """The block cannot be evaluated in the memory available, even in chunks of queries.

    Raised by :func:`nlref.forward` before it allocates anything.
    """


class AttentionNotStoredError(AttributeError):
    """``cache.attention`` was asked for, but the forward pass ran in chunks of queries."""


@dataclass(frozen=True)
class AttentionPlan:
    """How :func:`nlref.forward` evaluates the attention.

    Attributes
    ----------
    chunk_size : int or None
        Queries per block, or None when the whole (B, N, N′) attention is materialised
        (and cached for the backward).
    n_chunks : int
        Number of query blocks (1 when materialised).
    attention_bytes : int
        Bytes of the whole (B, N, N′) attention in the input's dtype.
    concurrent : int
        At most this many blocks may be evaluated at the same time (one per thread): the
        memory estimate counts that many.
    estimated_bytes : int
        Estimated peak bytes of forward plus backward with this plan (an estimate:
        :func:`working_set_bytes`).
    available_bytes : int or None
        The memory it was checked against (``memory_limit`` or what the system reports
        available), None when unknown.
    reason : str
        Why this plan, in words.
    """

    chunk_size: int | None
    n_chunks: int
    attention_bytes: int
    concurrent: int
    estimated_bytes: int
    available_bytes: int | None
    reason: str

    @property
    def materialised(self) -> bool:
        """Whether the whole attention is computed at once and cached."""
        return self.chunk_size is None


def _gib(n: float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"


def persistent_bytes(
    batch: int, channels: int, inter_channels: int, n: int, n_keys: int, itemsize: int
) -> int:
    """Estimated bytes of the O(N) arrays of forward plus backward (everything but A).

    x-sized arrays (the BN input, output and normalised values, z, dz, dx and their
    temporaries: about 8 of (B, C, N)), and the θ, φ, g, y branches with their gradients
    (about 12 of (B, C′, N) and 4 of (B, C′, N′), counting pre-pool values and max-pool
    indices).
    """
    per_batch = 8 * channels * n + 12 * inter_channels * n + 4 * inter_channels * n_keys
    return batch * per_batch * itemsize


def working_set_bytes(
    batch: int,
    channels: int,
    inter_channels: int,
    n: int,
    n_keys: int,
    itemsize: int,
    chunk_size: int | None,
    concurrent: int = 1,
) -> int:
    """Estimated peak bytes of forward plus backward when the queries run in blocks of
    ``chunk_size`` (None: all at once, the attention cached), ``concurrent`` blocks at a
    time (one per thread, see :mod:`nlref.parallel`)."""
    if chunk_size is None:
        rows = n  # the whole attention, however many threads evaluate its pieces
    else:
        rows = min(n, min(chunk_size, n) * max(1, concurrent))
    block = batch * rows * n_keys * itemsize
    return (
        persistent_bytes(batch, channels, inter_channels, n, n_keys, itemsize)
        + BLOCK_ARRAYS * block
    )


def available_memory(x: Any) -> int | None:
    """Bytes the system reports available where ``x`` lives, or None when unknown.

    Host arrays (NumPy, array-api-strict): ``MemAvailable`` of ``/proc/meminfo``, capped by
    the cgroup limit (``memory.max``) when one is set; CuPy: the device's free memory plus
    what CuPy's memory pool holds unused.
    """
    if array_api_compat.is_cupy_array(x):
        try:
            import cupy

            free, _total = cupy.cuda.runtime.memGetInfo()
            pool = cupy.get_default_memory_pool()
            return int(free) + int(pool.free_bytes())
        except Exception:  # no device query possible: do not guess
            return None
    if array_api_compat.is_numpy_array(x) or _is_host(x):
        return _host_available()
    return None


def chunk_memory(x: Any) -> int:
    """Target bytes of one attention block for arrays like ``x``: :data:`CHUNK_MEMORY_GPU`
    for CuPy arrays, :data:`CHUNK_MEMORY` otherwise."""
    return CHUNK_MEMORY_GPU if array_api_compat.is_cupy_array(x) else CHUNK_MEMORY


def _is_host(x: Any) -> bool:
    return type(x).__module__.split(".")[0] in ("numpy", "array_api_strict")


def _host_available() -> int | None:
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            headroom = int(limit) - used
            available = headroom if available is None else min(available, headroom)
    except (OSError, ValueError):
        pass
    return available


def plan_attention(
    shape: tuple[int, ...],
    n_keys: int,
    inter_channels: int,
    itemsize: int,
    *,
    chunk_size: int | None = None,
    available: int | None = None,
    block_bytes: int | None = None,
    concurrent: int = 1,
) -> AttentionPlan:
    """Choose how to evaluate the attention of a block on x of shape ``shape``.

    Parameters
    ----------
    shape : tuple
        (B, C, \\*S) of x.
    n_keys : int
        N′, key positions after pooling.
    inter_channels : int
        C′ (C for the Gaussian's inner product makes no difference to the memory).
    itemsize : int
        Bytes per element of x's dtype.
    chunk_size : int or None
        None: materialise the attention when it needs at most
        :data:`ATTENTION_MEMORY_LIMIT` bytes and fits, else chunk automatically (blocks of
        about :data:`CHUNK_MEMORY` bytes, smaller if memory is short). An int k ≥ 1: blocks
        of k queries; k ≥ N means all queries at once, the attention materialised.
    available : int or None
        Bytes available; None skips the check.
    block_bytes : int or None
        Target bytes of one block when chunking automatically; default
        :data:`CHUNK_MEMORY`.
    concurrent : int
        Blocks evaluated at the same time (the threads of :mod:`nlref.parallel`): the
        memory check counts that many blocks' temporaries.

    Raises
    ------
    TypeError, ValueError
        If ``chunk_size`` is not None or a positive int.
    MemoryLimitError
        If the plan (for ``chunk_size=None``: even blocks of one query) needs more than
        ``available``. Nothing has been allocated.
    """
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size}")
    batch, channels = shape[0], shape[1]
    n = math.prod(shape[2:])
    attention = batch * n * n_keys * itemsize
    dims = (batch, channels, inter_channels, n, n_keys, itemsize)
    where = (
        f"x of shape {tuple(shape)} (B={batch}, N={n}, N′={n_keys}, "
        f"{itemsize * 8}-bit floats; the (B, N, N′) attention is {_gib(attention)})"
    )

    def fits(rows: int | None) -> bool:
        return available is None or working_set_bytes(*dims, rows, concurrent) <= available

    def make(rows: int | None, reason: str) -> AttentionPlan:
        if rows is not None and rows >= n:
            rows = None
        return AttentionPlan(
            chunk_size=rows,
            n_chunks=1 if rows is None else math.ceil(n / rows),
            attention_bytes=attention,
            concurrent=concurrent,
            estimated_bytes=working_set_bytes(*dims, rows, concurrent),
            available_bytes=available,
            reason=reason,
        )

    threads_note = f" and {concurrent} blocks at a time (threads)" if concurrent > 1 else ""
    if chunk_size is not None:
        rows = min(chunk_size, n)
        if not fits(rows) and concurrent > 1:  # fewer blocks at a time before giving up
            return plan_attention(
                shape,
                n_keys,
                inter_channels,
                itemsize,
                chunk_size=chunk_size,
                available=available,
                block_bytes=block_bytes,
                concurrent=1,
            )
        if not fits(rows):
            smallest = working_set_bytes(*dims, 1, concurrent)
            hint = (
                "use a smaller chunk_size, or chunk_size=None to choose one"
                if available is not None and smallest <= available
                else "even chunk_size=1 would not fit"
            )
            raise MemoryLimitError(
                f"the Non-local block on {where} needs about "
                f"{_gib(working_set_bytes(*dims, rows, concurrent))} with chunk_size={chunk_size}"
                f"{threads_note}, "
                f"but {_gib(available or 0)} is available; {hint}"
            )
        if rows >= n:
            return make(None, f"chunk_size={chunk_size} >= N={n}: all queries at once")
        return make(rows, f"chunk_size={chunk_size} given")

    if attention <= ATTENTION_MEMORY_LIMIT and fits(None):
        return make(None, f"attention {_gib(attention)} <= ATTENTION_MEMORY_LIMIT")
    target = CHUNK_MEMORY if block_bytes is None else block_bytes
    rows = max(1, min(n, target // max(1, batch * n_keys * itemsize)))
    if not fits(rows):
        spare = (available or 0) - working_set_bytes(*dims, 0)
        rows = spare // (BLOCK_ARRAYS * batch * n_keys * itemsize * concurrent)
        if rows < 1 and concurrent > 1:  # fewer blocks at a time before giving up
            return plan_attention(
                shape,
                n_keys,
                inter_channels,
                itemsize,
                available=available,
                block_bytes=block_bytes,
                concurrent=1,
            )
        if rows < 1:
            raise MemoryLimitError(
                f"the Non-local block on {where} does not fit in the "
                f"{_gib(available or 0)} available, even in chunks of one query: it needs "
                f"about {_gib(working_set_bytes(*dims, 1))} "
                f"({_gib(working_set_bytes(*dims, 0))} for the O(N) arrays alone). "
                "Reduce the batch or the spatial size, or pool the keys (sub_sample)"
            )
    why = (
        f"attention {_gib(attention)} > ATTENTION_MEMORY_LIMIT ({_gib(ATTENTION_MEMORY_LIMIT)})"
        if attention > ATTENTION_MEMORY_LIMIT
        else f"materialising needs {_gib(working_set_bytes(*dims, None))} > "
        f"{_gib(available or 0)} available"
    )
    return make(rows, f"chunked automatically: {why}")


def gemm_flops(
    cfg: NonLocalConfig, shape: tuple[int, ...], *, chunked: bool = False
) -> dict[str, int]:
    """FLOPs (2 per multiply-add) of the matrix products of one forward and backward.

    Parameters
    ----------
    cfg : NonLocalConfig
    shape : tuple
        (B, C, \\*S) of x.
    chunked : bool
        Count the recomputation of θᵀφ per block in the backward (the chunked path).

    Returns
    -------
    dict
        ``{"forward": ..., "backward": ..., "recompute": ..., "total": ...}``. The
        concatenation's f needs no product over C′ per pair (w_θᵀθᵢ + w_φᵀφⱼ is O(N + N′)),
        so it has no θᵀφ product.
    """
    from .layers.maxpool import output_size
    from .pairwise import get as get_pairwise

    variant = get_pairwise(cfg.pairwise)
    b, c, *spatial = shape
    n = math.prod(spatial)
    keys = spatial if cfg.sub_sample is None else output_size(tuple(spatial), cfg.sub_sample)
    nk = math.prod(keys)
    ci = cfg.inter_channels
    before = cfg.sub_sample is not None and cfg.pool_order == "before_projection"
    key_positions = nk if before else n  # the key-side projections run on P(x) or on x
    mm = 2 * b  # 2 FLOPs per multiply-add, per batch element

    proj = mm * ci * c * ((n + 2 * key_positions) if variant.embeds else key_positions)
    pair_channels = ci if variant.embeds else c  # the Gaussian compares x itself
    logits = 0 if cfg.pairwise == "concatenation" else mm * n * nk * pair_channels
    aggregate = mm * ci * n * nk  # y = g A^T
    out = mm * c * ci * n  # W_z y
    forward = proj + logits + aggregate + out
    # each product has two gradients, each as costly as the product itself
    backward = 2 * forward
    recompute = logits if chunked else 0
    return {
        "forward": forward,
        "backward": backward,
        "recompute": recompute,
        "total": forward + backward + recompute,
    }
