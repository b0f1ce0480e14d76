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
- Run i is bound to CPU i of the caller's CPU set (``NLREF_BIND_THREADS=0`` turns it
  off), so that workers woken after a pause do not start on one CPU.
- The work is split statically (run r always gets the same blocks, in order) and the
  runs' partial sums are added in run order, so the results do not depend on
  scheduling: the same ``threads`` gives the same bits on every run.
- ``threads`` is the number of runs; at most :func:`usable_cpus` OS threads run them
  (nlref's worker threads, started once and kept), so a large ``threads`` does not start
  a thread per run.
- No worker outlives the call that handed it work, even when the call ends with an
  exception or a Ctrl-C (:func:`run_split`); and a process forked at any moment, even
  while another thread is inside a threaded call, starts with no workers, a free region
  lock and the BLAS thread count from before any region (:func:`region`).

Only NumPy-backed arrays (NumPy, array-api-strict) use threads: ``threads=None`` picks
:func:`default_threads` (the usable CPUs for a large enough NumPy problem, else 1). CuPy
arrays run on the calling thread (the GPU queues the work anyway), and so do PyTorch
tensors and JAX arrays, whose libraries run their own thread pools. The formulas are the
same whatever the thread count; only the order of a few floating-point sums over tiles
changes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import array_api_compat

from ..config import optional_count

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
    """Validate ``threads`` (None or an int ≥ 1, NumPy ints too) and return the thread count
    to use: the number of runs the work is split into (see :func:`run_split` for the OS
    threads that run them).

    Raises
    ------
    TypeError, ValueError
        If ``threads`` is not None or a positive int, or is above 1 for arrays that are
        not NumPy-backed: CuPy (GPU work is queued on the device's stream: threads would
        not run it any sooner), PyTorch and JAX (their own thread pools run each
        operation).
    """
    threads = optional_count("threads", threads, "an int >= 1")
    if threads is None:
        return default_threads(x, attention_elements)
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
    """``[work(run) for run in split(items, threads)]``, the runs on worker threads.

    With one run this is a plain call on the calling thread. Otherwise the runs go to
    nlref's worker threads, at most :func:`usable_cpus` of them (more runs than that wait
    their turn, so ``threads=10**6`` starts no more OS threads than there are CPUs), and
    the results come back in run order. ``work`` must go through its run with ``for``:
    each item is handed out only while the call is live, so that a call that ends early
    stops its workers between two items.

    No worker outlives the call. When a run raises, no further run or item starts, the
    running items are waited for, and the first exception (in run order) is raised here.
    When the calling thread is interrupted while it waits (``KeyboardInterrupt`` from
    Ctrl-C, say), the same happens before the interruption goes on, so that inside
    :func:`region` the BLAS limit still holds while the last items finish. A second
    interruption during that wait (one item can take a while) ends the wait at once.
    """
    runs = split(items, threads)
    if len(runs) == 1:
        return [work(runs[0])]
    cpus = _placement(len(runs))
    call = _Call(len(runs))
    pool = _workers
    try:
        pool.grow(min(len(runs), _max_workers()))
        for i, run in enumerate(runs):
            pool.tasks.put((call, i, cpus[i], work, _Run(run, call)))
        call.wait_all()
    except BaseException:  # the caller was interrupted: stop the workers, then go on
        call.stop_and_wait()
        raise
    if call.errors:
        call.stop_and_wait()
        first = min(i for i, err in call.errors.items() if not isinstance(err, _Stopped))
        raise call.errors[first]
    return [call.results[i] for i in range(len(runs))]


class _Stopped(Exception):
    """Raised in a worker, between two items, when its call has ended."""


class _Call:
    """One :func:`run_split` call: its runs' results and errors, how many of its runs are
    running, and whether it has stopped (no run or item starts any more)."""

    def __init__(self, runs: int) -> None:
        self.runs = runs
        self.cond = threading.Condition(threading.Lock())
        self.running = 0
        self.finished = 0
        self.stopped = False
        self.results: dict[int, Any] = {}
        self.errors: dict[int, BaseException] = {}

    def run(self, i: int, cpus: set[int] | None, work: Callable[[Any], Any], run: Any) -> None:
        """Run ``work(run)`` on this worker thread, unless the call has stopped."""
        with self.cond:
            if self.stopped:
                return
            self.running += 1
        try:
            if cpus is not None:
                os.sched_setaffinity(0, cpus)  # this worker thread only (Linux: pid 0)
            result, error = work(run), None
        except BaseException as err:  # reported to the caller, raised there
            result, error = None, err
        with self.cond:
            self.running -= 1
            self.finished += 1
            if error is None:
                self.results[i] = result
            else:
                self.errors[i] = error
                self.stopped = True  # the others stop between two items
            self.cond.notify_all()

    def wait_all(self) -> None:
        """Until every run has finished, or one has failed."""
        with self.cond:
            while self.finished < self.runs and not self.errors:
                self.cond.wait()

    def stop_and_wait(self) -> None:
        """No run or item starts any more; wait for the running ones."""
        with self.cond:
            self.stopped = True
            while self.running:
                self.cond.wait()


class _Run(list):  # type: ignore[type-arg]
    """A run of items that stops handing them out once its call has stopped."""

    def __init__(self, items: list[Any], call: _Call) -> None:
        super().__init__(items)
        self._call = call

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self)):
            if self._call.stopped:
                raise _Stopped("the call that handed out this run has ended")
            yield self[i]


class _Workers:
    """nlref's worker threads: daemon threads that take runs from one queue.

    Started on demand and kept; robust to an interruption while one starts (a thread
    object that never started is dropped at the next :meth:`grow`)."""

    def __init__(self) -> None:
        self.tasks: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []

    def grow(self, n: int) -> None:
        """At least ``n`` worker threads alive."""
        self.threads = [t for t in self.threads if t.is_alive()]
        while len(self.threads) < n:
            name = f"nlref_{len(self.threads)}"
            thread = threading.Thread(target=self._serve, name=name, daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self) -> None:
        while True:
            call, i, cpus, work, run = self.tasks.get()
            call.run(i, cpus, work, run)
            del call, work, run  # hold nothing of a finished call while idle


_workers = _Workers()


def _max_workers() -> int:
    """Worker threads at most: :func:`usable_cpus` (the affinity mask when
    ``NLREF_NUM_THREADS`` is invalid: an explicit ``threads`` does not read it)."""
    try:
        return usable_cpus()
    except ValueError:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1


def binds_threads() -> bool:
    """Whether workers are bound to CPUs: yes unless ``NLREF_BIND_THREADS=0``, where the
    OS lets a thread choose its CPUs (Linux)."""
    return os.environ.get("NLREF_BIND_THREADS", "1") != "0" and hasattr(os, "sched_setaffinity")


def _placement(runs: int) -> list[set[int] | None]:
    """The CPUs each of ``runs`` workers may use: CPU i of the calling thread's set for
    worker i when there are enough of them and binding is on, else the whole set.

    Why bind: after the process has slept (between two calls of a training loop, say),
    Linux wakes both workers on the CPU that woke them, and needs 10-20 ms to move one
    away; measured on a 2-core machine, a forward after a 0.5 s pause took 25 ms
    instead of 15 ms. Bound workers start on their own CPUs at once.
    """
    if not hasattr(os, "sched_getaffinity"):
        return [None] * runs
    allowed = os.sched_getaffinity(0)
    if not binds_threads() or runs > len(allowed):
        return [allowed] * runs  # undo any earlier binding: follow the caller's CPUs
    return [{cpu} for cpu in sorted(allowed)[:runs]]


@contextlib.contextmanager
def region(threads: int) -> Iterator[None]:
    """Hold the BLAS library at one thread while nlref runs ``threads`` > 1 workers.

    The whole forward (or backward) runs inside: OpenBLAS's own threads keep spinning for
    a while after a multi-threaded call, and would take the cores from the workers. BLAS
    limits are process-wide, so one region runs at a time (a re-entrant lock); the
    previous limits are restored on exit. With ``threads`` = 1 nothing changes.

    Fork-safe: a child forked while another thread is inside a region (or after one)
    starts with a free lock, no pool threads to wait for, and the BLAS limits from before
    that region (:func:`os.register_at_fork`).
    """
    if threads <= 1:
        yield
        return
    state = _state
    with state.lock:
        controller = _controller()
        if state.depth == 0:
            state.saved = [lib.num_threads for lib in controller.lib_controllers]
            state.owner = threading.get_ident()
        state.depth += 1
        try:
            with controller.limit(limits=1):
                yield
        finally:
            state.depth -= 1


class _RegionState:
    """The lock of :func:`region`, how deep the regions of its holder are nested, and the
    BLAS thread counts from before the outermost one."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.depth = 0
        self.owner: int | None = None
        self.saved: list[int] | None = None


_state = _RegionState()


def _after_fork_in_child() -> None:
    """In a forked child only the forking thread exists: the pools' threads, and the
    thread that may hold the region (and the BLAS limit), are gone. Start afresh."""
    global _state, _workers
    _workers = _Workers()  # the workers do not exist here: a new call starts new ones
    old = _state
    if old.depth and old.owner == threading.get_ident():
        return  # forked from inside a region of this very thread: it ends it normally
    if old.depth and old.saved is not None:  # another thread's region: undo its BLAS limit
        for lib, n in zip(_controller().lib_controllers, old.saved, strict=False):
            lib.set_num_threads(n)
    _state = _RegionState()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


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
