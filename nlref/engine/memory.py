r"""The memory plan: how much of the attention to hold at once, and on how many threads.

Shapes: x (B, C, \*S) with N = prod(S) query positions, N′ key positions after pooling,
C′ inner channels.

Tiles
-----
The attention A = f / C(x) is a (B, N, N′) array: at N = N′ = 16,384 it is 1 GiB in
float32, before the temporaries of the softmax and of the backward. Every pairwise function
is a function of one query row at a time (the softmax normalises each row on its own; the
dot product and the concatenation divide by the constant N′), so the rows of A, and the
rows of y = g Aᵀ, can be computed in tiles of queries, exactly:

.. math::

    A_{[i_0, i_1)} = \frac{f(\theta_{[i_0, i_1)}, \phi)}{C(x)_{[i_0, i_1)}},\qquad
    y_{[i_0, i_1)} = g\, A_{[i_0, i_1)}^\top.

:func:`plan` decides, before anything is allocated:

- **the tiles**: all queries in one tile (the attention *materialised* and cached for the
  backward), or tiles of ``chunk_size`` queries whose attention the backward recomputes
  (:mod:`nlref.engine.tiles`). With ``chunk_size=None`` the attention is materialised when
  the working set fits in the memory available and, for host arrays, the attention needs
  at most :data:`ATTENTION_MEMORY_LIMIT`; a GPU materialises whatever fits in its free
  memory. Otherwise tiles of about :data:`CHUNK_MEMORY` (host) or
  :data:`CHUNK_MEMORY_GPU` (device) bytes are used, and :class:`MemoryLimitError` is raised
  when even tiles of one query would not fit.
- **the threads** (:mod:`nlref.engine.threads`).
- whether the reference path of :mod:`nlref.block` suffices (one tile, one thread): then
  the engine is not used at all (:attr:`Plan.uses_engine`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import array_api_compat

from ..config import NonLocalConfig, optional_count
from . import threads as threads_

__all__ = [
    "ATTENTION_MEMORY_LIMIT",
    "CHUNK_MEMORY",
    "CHUNK_MEMORY_GPU",
    "AttentionNotStoredError",
    "MemoryLimitError",
    "Plan",
    "available_memory",
    "chunk_memory",
    "is_device_array",
    "plan",
    "plan_tiles",
    "working_set_bytes",
]

#: Bytes of the (B, N, N′) attention of host arrays above which :func:`nlref.forward`
#: evaluates the queries in tiles by itself (``chunk_size=None``). 256 MiB: N = N′ = 8,192
#: at B = 1 in float32 is materialised, N = N′ = 16,384 is not. Device arrays (CuPy, CUDA
#: tensors) materialise whatever fits in the device's free memory.
ATTENTION_MEMORY_LIMIT = 256 * 2**20

#: Target bytes of one (B, k, N′) tile of the attention when tiling automatically on the
#: CPU: 8 MiB keeps a tile and its temporaries in a CPU's last-level cache.
CHUNK_MEMORY = 8 * 2**20

#: The same on a GPU, where fewer, larger tiles keep the device busy.
CHUNK_MEMORY_GPU = 256 * 2**20

#: Arrays of the size of one attention tile alive at once (the tile, the temporaries of
#: the softmax, and in the backward its gradient): the working set is this many tiles.
TILE_ARRAYS = 4


class MemoryLimitError(MemoryError):
    """The block cannot be evaluated in the memory available, even in tiles of one query.

    Raised by :func:`nlref.forward` before it allocates anything.
    """


class AttentionNotStoredError(AttributeError):
    """``cache.attention`` was asked for, but the forward pass ran in tiles of queries."""


@dataclass(frozen=True)
class Plan:
    """How :func:`nlref.forward` evaluates the block.

    Attributes
    ----------
    chunk_size : int or None
        Queries per tile, or None when all queries are one tile: the whole (B, N, N′)
        attention is materialised (and cached for the backward).
    n_tiles : int
        Number of tiles of queries (1 when materialised).
    threads : int
        CPU threads, forward and backward (:mod:`nlref.engine.threads`).
    concurrent : int
        At most this many tiles are evaluated at the same time (one per thread): the
        memory estimate counts that many.
    attention_bytes : int
        Bytes of the whole (B, N, N′) attention in the input's dtype.
    estimated_bytes : int
        Estimated peak bytes of forward plus backward with this plan
        (:func:`working_set_bytes`).
    available_bytes : int or None
        The memory it was checked against (``memory_limit`` or what the system reports
        available), None when unknown.
    reason : str
        Why these tiles, in words.
    """

    chunk_size: int | None
    n_tiles: int
    threads: int
    concurrent: int
    attention_bytes: int
    estimated_bytes: int
    available_bytes: int | None
    reason: str

    @property
    def materialised(self) -> bool:
        """Whether the whole attention is computed at once and cached."""
        return self.chunk_size is None

    @property
    def uses_engine(self) -> bool:
        """Whether the engine runs the block (tiles or threads), rather than the reference
        path of :mod:`nlref.block`."""
        return not self.materialised or self.threads > 1


def plan(
    x: Any,
    cfg: NonLocalConfig,
    *,
    chunk_size: int | None = None,
    memory_limit: int | None = None,
    threads: int | None = None,
) -> Plan:
    """Plan the evaluation of the block with config ``cfg`` on x (B, C, \\*S).

    Parameters
    ----------
    chunk_size : int or None
        Evaluate the attention in tiles of this many queries, and recompute each tile in
        the backward instead of caching the (B, N, N′) attention: exact (every pairwise
        function normalises each query row on its own), in O(B·chunk_size·N′) memory.
        ``chunk_size >= N`` means all queries at once. None: decided by the memory (see
        the module docstring).
    memory_limit : int or None
        Bytes the block may use (an int, NumPy ints too); None: what the system reports available
        (:func:`available_memory`). Checked against an estimate before anything is
        allocated.
    threads : int or None
        CPU threads (:func:`nlref.engine.threads.resolve_threads`): runs of batch elements
        go to separate threads when B ≥ threads, else the tiles do; BLAS runs one thread
        per worker meanwhile. The work is split into ``threads`` runs (capped at B·N, one
        query row each), which fixes the order of the sums and so the bits of the result;
        at most :func:`nlref.engine.threads.usable_cpus` OS threads run them. None: every
        usable CPU for NumPy arrays whose attention has at least
        :data:`nlref.engine.threads.MIN_PARALLEL_ELEMENTS` elements, else 1.

    Raises
    ------
    TypeError, ValueError
        For a ``chunk_size``, ``memory_limit`` or ``threads`` of the wrong type or value.
    MemoryLimitError
        When even tiles of one query would not fit.
    """
    memory_limit = optional_count("memory_limit", memory_limit, "a positive int (bytes)")
    b, _, *spatial = x.shape
    n, n_keys = math.prod(spatial), math.prod(cfg.key_shape(spatial))
    # more threads than pieces of work (B·N query rows) change nothing: cap them there
    n_threads = min(threads_.resolve_threads(threads, x, b * n * n_keys), b * n)
    tiles = plan_tiles(
        tuple(x.shape),
        n_keys,
        cfg.inter_channels,
        4 if x.dtype == array_api_compat.array_namespace(x).float32 else 8,
        chunk_size=chunk_size,
        available=available_memory(x) if memory_limit is None else memory_limit,
        tile_bytes=chunk_memory(x),
        # T threads hold T tiles at once, except when each holds its own run of the batch
        concurrent=1 if b >= n_threads else n_threads,
        host_limit=not is_device_array(x),
    )
    if b < n_threads:
        n_threads = min(n_threads, tiles.concurrent)
    return Plan(
        chunk_size=tiles.chunk_size,
        n_tiles=tiles.n_tiles,
        threads=n_threads,
        concurrent=tiles.concurrent,
        attention_bytes=tiles.attention_bytes,
        estimated_bytes=tiles.estimated_bytes,
        available_bytes=tiles.available_bytes,
        reason=tiles.reason,
    )


def _mib(n: float) -> str:
    """Bytes in the largest unit that keeps the number visible (GiB, MiB, KiB, bytes)."""
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    if n >= 2**10:
        return f"{n / 2**10:.1f} KiB"
    return f"{int(n)} byte" if n == 1 else f"{int(n)} bytes"


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
    """Estimated peak bytes of forward plus backward when the queries run in tiles of
    ``chunk_size`` (None: all at once, the attention cached), ``concurrent`` tiles at a
    time (one per thread)."""
    if chunk_size is None:
        rows = n  # the whole attention, however many threads evaluate its pieces
    else:
        rows = min(n, min(chunk_size, n) * max(1, concurrent))
    tile = batch * rows * n_keys * itemsize
    return (
        persistent_bytes(batch, channels, inter_channels, n, n_keys, itemsize) + TILE_ARRAYS * tile
    )


def is_device_array(x: Any) -> bool:
    """Whether ``x`` lives on a GPU (a CuPy array, or a CUDA torch tensor)."""
    if array_api_compat.is_cupy_array(x):
        return True
    return array_api_compat.is_torch_array(x) and x.device.type == "cuda"


def available_memory(x: Any) -> int | None:
    """Bytes the system reports available where ``x`` lives, or None when unknown.

    Host arrays (NumPy, array-api-strict, CPU torch tensors and JAX arrays):
    ``MemAvailable`` of ``/proc/meminfo``, capped by the cgroup limit (``memory.max``)
    when one is set. CuPy: the device's free memory plus what CuPy's memory pool holds
    unused; CUDA tensors: the device's free memory plus what PyTorch's caching allocator
    holds unused.
    """
    if array_api_compat.is_cupy_array(x):
        try:
            import cupy

            free, _total = cupy.cuda.runtime.memGetInfo()
            return int(free) + int(cupy.get_default_memory_pool().free_bytes())
        except Exception:  # no device query possible: do not guess
            return None
    if array_api_compat.is_torch_array(x) and x.device.type == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(x.device)
        unused = torch.cuda.memory_reserved(x.device) - torch.cuda.memory_allocated(x.device)
        return int(free) + int(unused)
    if _is_host(x):
        return _host_available()
    return None


def chunk_memory(x: Any) -> int:
    """Target bytes of one attention tile for arrays like ``x``: :data:`CHUNK_MEMORY_GPU`
    on a GPU, :data:`CHUNK_MEMORY` otherwise."""
    return CHUNK_MEMORY_GPU if is_device_array(x) else CHUNK_MEMORY


def _is_host(x: Any) -> bool:
    if array_api_compat.is_numpy_array(x) or array_api_compat.is_torch_array(x):
        return True  # (CUDA tensors are handled before)
    if array_api_compat.is_jax_array(x):
        try:
            return all(d.platform == "cpu" for d in x.devices())
        except Exception:  # a tracer under jax.jit has no devices: the memory is unknown
            return False
    return type(x).__module__.split(".")[0] == "array_api_strict"


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


@dataclass(frozen=True)
class _Tiles:
    chunk_size: int | None
    n_tiles: int
    concurrent: int
    attention_bytes: int
    estimated_bytes: int
    available_bytes: int | None
    reason: str


def plan_tiles(
    shape: tuple[int, ...],
    n_keys: int,
    inter_channels: int,
    itemsize: int,
    *,
    chunk_size: int | None = None,
    available: int | None = None,
    tile_bytes: int | None = None,
    concurrent: int = 1,
    host_limit: bool = True,
) -> _Tiles:
    """Choose the tiles of the attention of a block on x of shape ``shape`` (B, C, \\*S).

    ``n_keys`` is N′, ``itemsize`` the bytes per element, ``available`` the bytes
    available (None skips the check), ``tile_bytes`` the target bytes of one tile when
    tiling automatically, ``concurrent`` the tiles evaluated at the same time (threads),
    and ``host_limit`` whether :data:`ATTENTION_MEMORY_LIMIT` applies (host arrays).
    See :func:`plan`.
    """
    chunk_size = optional_count("chunk_size", chunk_size, "an int >= 1")
    batch, channels = shape[0], shape[1]
    n = math.prod(shape[2:])
    attention = batch * n * n_keys * itemsize
    dims = (batch, channels, inter_channels, n, n_keys, itemsize)
    where = (
        f"x of shape {tuple(shape)} (B={batch}, N={n}, N′={n_keys}, "
        f"{itemsize * 8}-bit floats; the (B, N, N′) attention is {_mib(attention)})"
    )
    again = dict(
        shape=shape, n_keys=n_keys, inter_channels=inter_channels, itemsize=itemsize,
        chunk_size=chunk_size, available=available, tile_bytes=tile_bytes, concurrent=1,
        host_limit=host_limit,
    )  # fmt: skip

    def fits(rows: int | None) -> bool:
        return available is None or working_set_bytes(*dims, rows, concurrent) <= available

    def make(rows: int | None, reason: str) -> _Tiles:
        if rows is not None and rows >= n:
            rows = None
        return _Tiles(
            chunk_size=rows,
            n_tiles=1 if rows is None else math.ceil(n / rows),
            concurrent=concurrent,
            attention_bytes=attention,
            estimated_bytes=working_set_bytes(*dims, rows, concurrent),
            available_bytes=available,
            reason=reason,
        )

    threads_note = f" and {concurrent} tiles at a time (threads)" if concurrent > 1 else ""
    if chunk_size is not None:
        rows = min(chunk_size, n)
        if not fits(rows) and concurrent > 1:  # fewer tiles at a time before giving up
            return plan_tiles(**again)
        if not fits(rows):
            smallest = working_set_bytes(*dims, 1, concurrent)
            hint = (
                "use a smaller chunk_size, or chunk_size=None to choose one"
                if available is not None and smallest <= available
                else "even chunk_size=1 would not fit"
            )
            raise MemoryLimitError(
                f"the Non-local block on {where} needs about "
                f"{_mib(working_set_bytes(*dims, rows, concurrent))} with "
                f"chunk_size={chunk_size}{threads_note}, but {_mib(available or 0)} is "
                f"available; {hint}"
            )
        if rows >= n:
            return make(None, f"chunk_size={chunk_size} >= N={n}: all queries at once")
        return make(rows, f"chunk_size={chunk_size} given")

    small = not host_limit or attention <= ATTENTION_MEMORY_LIMIT
    if small and fits(None):
        why = "fits in the device's free memory" if not host_limit else "<= ATTENTION_MEMORY_LIMIT"
        return make(None, f"attention {_mib(attention)} {why}")
    target = CHUNK_MEMORY if tile_bytes is None else tile_bytes
    rows = max(1, min(n, target // max(1, batch * n_keys * itemsize)))
    if not fits(rows):
        spare = (available or 0) - working_set_bytes(*dims, 0)
        rows = spare // (TILE_ARRAYS * batch * n_keys * itemsize * concurrent)
        if rows < 1 and concurrent > 1:  # fewer tiles at a time before giving up
            return plan_tiles(**again)
        if rows < 1:
            raise MemoryLimitError(
                f"the Non-local block on {where} does not fit in the "
                f"{_mib(available or 0)} available, even in tiles of one query: it needs "
                f"about {_mib(working_set_bytes(*dims, 1))} "
                f"({_mib(working_set_bytes(*dims, 0))} for the O(N) arrays alone). "
                "Reduce the batch or the spatial size, or pool the keys (sub_sample)"
            )
    why = (
        f"attention {_mib(attention)} > ATTENTION_MEMORY_LIMIT ({_mib(ATTENTION_MEMORY_LIMIT)})"
        if not small
        else f"materialising needs {_mib(working_set_bytes(*dims, None))} > "
        f"{_mib(available or 0)} available"
    )
    return make(rows, f"tiled automatically: {why}")
