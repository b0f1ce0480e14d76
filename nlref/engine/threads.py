r"""Run independent pieces of the block on several CPU threads.

The block splits into independent pieces: up to W_z y, each batch element is on its own;
and within one batch element, a tile of query rows Q only needs θ_Q, φ and g (every
pairwise function normalises one query row at a time). The engine therefore hands
contiguous runs of batch elements, or of tiles, to ``threads`` worker threads.

- NumPy releases the GIL inside its ufuncs and its ``matmul``, so the threads really run
  at once: the elementwise passes (softmax, ReLU, masks), which NumPy runs on one core,
  then use every core, and each thread's matrix products run on their own core.
- For the whole forward (and the whole backward) the BLAS library is limited to **one
  thread** (threadpoolctl, :func:`region`), so that two workers never start two BLAS
  thread pools on the same cores, and no idle BLAS thread spins on them.
- Worker i is bound to CPU i of the caller's CPU set (``NLREF_BIND_THREADS=0`` turns it
  off), so that workers woken after a pause do not start on one CPU.
- The work is split statically (worker w always gets the same blocks, in order) and the
  workers' partial sums are added in worker order, so the results do not depend on
  scheduling: the same ``threads`` gives the same bits on every run.

Only NumPy-backed arrays (NumPy, array-api-strict) use threads: ``threads=None`` picks
:func:`default_threads` (the usable CPUs for a large enough NumPy problem, else 1). CuPy
arrays run on the calling thread (the GPU queues the work anyway), and so do PyTorch
tensors and JAX arrays, whose libraries run their own thread pools. The formulas are the
same whatever the thread count; only the order of a few floating-point sums over tiles
changes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import array_api_compat

__all__ = [
    "MIN_PARALLEL_ELEMENTS",
    "binds_threads",
    "default_threads",
    "limited_libraries",
    "region",
    "resolve_threads",
    "run_split",
    "split",
    "usable_cpus",
]

T = TypeVar("T")
R = TypeVar("R")

MIN_PARALLEL_ELEMENTS = 2**16
"""Below this many attention elements B·N·N′, ``threads=None`` runs on one thread: the
work is too small to pay for handing it to workers (about 0.1 ms)."""


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one).

    ``NLREF_NUM_THREADS`` overrides it (a positive int).
    """
    env = os.environ.get("NLREF_NUM_THREADS")
    if env:
        try:
            value = int(env)
        except ValueError:
            raise ValueError(f"NLREF_NUM_THREADS must be a positive int, got {env!r}") from None
        if value < 1:
            raise ValueError(f"NLREF_NUM_THREADS must be a positive int, got {env!r}")
        return value
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads(x: Any, attention_elements: int) -> int:
    """Threads for ``threads=None``: :func:`usable_cpus` for NumPy arrays when the
    attention has at least :data:`MIN_PARALLEL_ELEMENTS` elements, else 1."""
    cpus = usable_cpus()  # validates NLREF_NUM_THREADS whatever the size
    if not array_api_compat.is_numpy_array(x) or attention_elements < MIN_PARALLEL_ELEMENTS:
        return 1
    return cpus


def resolve_threads(threads: int | None, x: Any, attention_elements: int) -> int:
    """Validate ``threads`` (None or an int ≥ 1) and return the thread count to use.

    Raises
    ------
    TypeError, ValueError
        If ``threads`` is not None or a positive int, or is above 1 for arrays that are
        not NumPy-backed: CuPy (GPU work is queued on the device's stream: threads would
        not run it any sooner), PyTorch and JAX (their own thread pools run each
        operation).
    """
    if threads is None:
        return default_threads(x, attention_elements)
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise TypeError(f"threads must be None or an int >= 1, got {threads!r}")
    if threads < 1:
        raise ValueError(f"threads must be None or an int >= 1, got {threads}")
    if threads > 1 and not _numpy_backed(x):
        kind = "CuPy arrays" if array_api_compat.is_cupy_array(x) else f"{_library(x)} arrays"
        raise ValueError(
            f"threads={threads} is for NumPy and array-api-strict arrays; {kind} run on the "
            "calling thread (use threads=None or 1)"
        )
    return threads


def _numpy_backed(x: Any) -> bool:
    if array_api_compat.is_numpy_array(x):
        return True
    return type(x).__module__.split(".")[0] == "array_api_strict"


def _library(x: Any) -> str:
    if array_api_compat.is_torch_array(x):
        return "PyTorch"
    if array_api_compat.is_jax_array(x):
        return "JAX"
    return type(x).__module__.split(".")[0]


def split(items: Sequence[T], parts: int) -> list[list[T]]:
    """``items`` in at most ``parts`` contiguous runs of near-equal length, in order."""
    parts = max(1, min(parts, len(items)))
    bounds = [len(items) * w // parts for w in range(parts + 1)]
    return [list(items[bounds[w] : bounds[w + 1]]) for w in range(parts)]


def run_split(work: Callable[[list[T]], R], items: Sequence[T], threads: int) -> list[R]:
    """``[work(run) for run in split(items, threads)]``, the runs on ``threads`` threads.

    With one run this is a plain call on the calling thread. Otherwise the runs go to a
    thread pool and the results come back in run order; when a run raises, the others
    are waited for and then the first exception (in run order) is raised here. Call it
    inside :func:`region` (which keeps BLAS to one thread per worker).
    """
    runs = split(items, threads)
    if len(runs) == 1:
        return [work(runs[0])]
    cpus = _placement(len(runs))
    futures = [_pool(len(runs)).submit(_on_cpus, cpus[i], work, run) for i, run in enumerate(runs)]
    concurrent.futures.wait(futures)  # all of them, even when one fails: none outlives us
    return [future.result() for future in futures]


def binds_threads() -> bool:
    """Whether workers are bound to CPUs: yes unless ``NLREF_BIND_THREADS=0``, where the
    OS lets a thread choose its CPUs (Linux)."""
    return os.environ.get("NLREF_BIND_THREADS", "1") != "0" and hasattr(os, "sched_setaffinity")


def _placement(runs: int) -> list[set[int] | None]:
    """The CPUs each of ``runs`` workers may use: CPU i of the calling thread's set for
    worker i when there are enough of them and binding is on, else the whole set.

    Why bind: after the process has slept (between two calls of a training loop, say),
    Linux wakes both workers on the CPU that woke them, and needs 10-20 ms to move one
    away; measured on the 2-core machine, a forward after a 0.5 s pause took 25 ms
    instead of 15 ms. Bound workers start on their own CPUs at once.
    """
    if not hasattr(os, "sched_getaffinity"):
        return [None] * runs
    allowed = os.sched_getaffinity(0)
    if not binds_threads() or runs > len(allowed):
        return [allowed] * runs  # undo any earlier binding: follow the caller's CPUs
    return [{cpu} for cpu in sorted(allowed)[:runs]]


def _on_cpus(cpus: set[int] | None, work: Callable[[list[T]], R], run: list[T]) -> R:
    if cpus is not None:
        os.sched_setaffinity(0, cpus)  # this worker thread only (Linux: pid 0)
    return work(run)


@contextlib.contextmanager
def region(threads: int) -> Iterator[None]:
    """Hold the BLAS library at one thread while nlref runs ``threads`` > 1 workers.

    The whole forward (or backward) runs inside: OpenBLAS's own threads keep spinning for
    a while after a multi-threaded call, and would take the cores from the workers. BLAS
    limits are process-wide, so one region runs at a time (a re-entrant lock); the
    previous limits are restored on exit. With ``threads`` = 1 nothing changes.
    """
    if threads <= 1:
        yield
        return
    with _region_lock, _controller().limit(limits=1):
        yield


_region_lock = threading.RLock()


@functools.lru_cache(maxsize=8)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nlref")


@functools.lru_cache(maxsize=1)
def _controller() -> Any:
    """threadpoolctl's view of the BLAS libraries loaded when it is first needed, NumPy's
    among them (NumPy loads its BLAS on import). Made once: scanning the loaded libraries
    costs about half a millisecond. A BLAS loaded later (PyTorch's, say) is not limited:
    nlref never calls it."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas")


def limited_libraries() -> list[str]:
    """Paths of the BLAS libraries :func:`region` holds at one thread."""
    return [lib.filepath for lib in _controller().lib_controllers]
