"""The engine's CPU threads: ``nlref.forward(..., threads=T)`` and
:mod:`nlref.engine.threads`.

(That threaded results equal the reference is proven in ``test_engine.py``.) Here:

- the attention really runs on nlref's worker threads, in both split modes;
- ``threads=None`` picks the usable CPUs only for a large enough NumPy block;
- bad ``threads`` / ``NLREF_NUM_THREADS`` are refused, and so is ``threads > 1`` for
  arrays whose library runs its own threads or queue (CuPy, PyTorch, JAX);
- :func:`split` and :func:`run_split`: contiguous near-equal runs, results in run order,
  a worker's exception reaches the caller;
- BLAS is held at one thread inside :func:`region` and restored after it, even when a
  worker fails, and the pool still works afterwards;
- worker i is bound to CPU i (``NLREF_BIND_THREADS=0`` turns it off), with the same bits.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import Any

import array_api_compat
import numpy as np
import pytest
import threadpoolctl

import nlref
from nlref.engine import threads as engine_threads

from . import grid
from .conftest import require
from .grid import C_INTER, C, assert_same, run


def blas_threads() -> list[tuple[str, int]]:
    """Threads of the BLAS libraries nlref limits (NumPy's; a BLAS loaded later, such as
    PyTorch's, is not nlref's business)."""
    limited = set(engine_threads.limited_libraries())
    assert limited, "nlref.engine.threads limits no BLAS library: NumPy's BLAS was not found"
    return [
        (info["filepath"], info["num_threads"])
        for info in threadpoolctl.threadpool_info()
        if info["user_api"] == "blas" and info["filepath"] in limited
    ]


@pytest.fixture
def blas_two() -> Any:
    """BLAS at two threads for the test (so that a limit of one shows even on a one-CPU
    machine), and the process's own setting back afterwards whatever the test did."""
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        yield blas_threads()


def attention_functions(variant: Any, wrap: Any) -> Any:
    """``variant`` with the functions that compute its attention wrapped by ``wrap``:
    ``forward`` and, for a softmax variant, the logits step the engine runs instead."""
    changes = {"forward": wrap(variant.forward)}
    if variant.logits is not None:
        logits = dataclasses.replace(variant.logits, forward=wrap(variant.logits.forward))
        changes["logits"] = logits
    return dataclasses.replace(variant, **changes)


def patch_variants(monkeypatch: pytest.MonkeyPatch, replace: Any) -> None:
    """Hand ``replace(variant)`` to the reference and to the engine."""
    real_get = nlref.pairwise.get
    monkeypatch.setattr(nlref.block, "get_pairwise", lambda name: replace(real_get(name)))
    monkeypatch.setattr(nlref.engine.run, "get_pairwise", lambda name: replace(real_get(name)))


# --- 1. the work runs on nlref's threads -----------------------------------------------------


def test_workers_really_run_on_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both split modes hand the attention to nlref's worker threads (not the caller)."""
    names: list[str] = []
    lock = threading.Lock()

    def recording(fn: Any) -> Any:
        def wrapped(*args: Any) -> Any:
            with lock:
                names.append(threading.current_thread().name)
            time.sleep(0.02)  # let the other worker start meanwhile
            return fn(*args)

        return wrapped

    patch_variants(monkeypatch, lambda variant: attention_functions(variant, recording))
    for batch in (3, 1):
        cfg, x, _, params = grid.make_case("embedded_gaussian", 2, "full", batch=batch)
        names.clear()
        nlref.forward(x, params, cfg, threads=2)
        assert len(names) == 2
        assert all(name.startswith("nlref") for name in names), names
        assert len(set(names)) == 2, names
        names.clear()
        nlref.forward(x, params, cfg, threads=1)
        assert names == [threading.current_thread().name]


# --- 2. the default thread count ------------------------------------------------------------


def big_case(batch: int, spatial: tuple[int, ...], xp: Any = None) -> tuple[Any, Any, Any]:
    cfg = nlref.NonLocalConfig(in_channels=C, inter_channels=C_INTER)
    params = nlref.init_params(cfg, rng=0, scheme="random", xp=xp)
    x = np.random.default_rng(1).standard_normal((batch, C, *spatial))
    return cfg, (x if xp is None else xp.asarray(x)), params


@pytest.mark.parametrize(
    ("batch", "spatial", "expected", "n_runs"),
    [
        (1, (16, 16), 2, 1),  # B·N·N′ = 65536 = MIN_PARALLEL_ELEMENTS
        (1, (15, 17), 1, 0),  # 65025: the reference path
        (2, (12, 12), 1, 0),  # 41472
        (4, (12, 12), 2, 2),  # 82944: B >= threads, the batch is split
    ],
)
def test_default_threads(
    batch: int,
    spatial: tuple,
    expected: int,
    n_runs: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NLREF_NUM_THREADS", "2")
    assert engine_threads.usable_cpus() == 2
    cfg, x, params = big_case(batch, spatial)
    n = int(np.prod(spatial))
    assert engine_threads.default_threads(x, batch * n * n) == expected
    assert nlref.engine.plan(x, cfg).threads == expected
    _, cache = nlref.forward(x, params, cfg)
    if n_runs:
        assert cache.threads == expected
        assert len(cache.runs) == n_runs
    else:
        assert isinstance(cache, nlref.BlockCache)  # one thread, one tile


def test_default_threads_usable_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without NLREF_NUM_THREADS: the CPUs of the affinity mask, on a large NumPy block."""
    monkeypatch.delenv("NLREF_NUM_THREADS", raising=False)
    cpus = engine_threads.usable_cpus()
    assert cpus >= 1
    if hasattr(os, "sched_getaffinity"):
        assert cpus == len(os.sched_getaffinity(0))
    cfg, x, _ = big_case(1, (16, 16))
    plan = nlref.engine.plan(x, cfg)
    assert plan.threads == min(cpus, plan.concurrent) == cpus
    cfg, x, _ = big_case(1, (3, 3))  # tiny: one thread
    assert nlref.engine.plan(x, cfg).threads == 1
    assert engine_threads.default_threads(x, engine_threads.MIN_PARALLEL_ELEMENTS - 1) == 1
    assert engine_threads.default_threads(x, engine_threads.MIN_PARALLEL_ELEMENTS) == cpus


def test_default_threads_array_api_strict(monkeypatch: pytest.MonkeyPatch) -> None:
    xp = require("array_api_strict")
    monkeypatch.setenv("NLREF_NUM_THREADS", "2")
    cfg, x, params = big_case(1, (16, 16), xp=xp)
    assert engine_threads.default_threads(x, 10**9) == 1
    _, cache = nlref.forward(x, params, cfg)
    assert isinstance(cache, nlref.BlockCache)
    _, cache = nlref.forward(x, params, cfg, threads=2)  # explicit threads do run
    assert cache.threads == 2


def test_explicit_threads_ignore_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NLREF_NUM_THREADS", "abc")
    cfg, x, params = big_case(1, (16, 16))
    _, cache = nlref.forward(x, params, cfg, threads=3)
    assert cache.threads == 3


# --- 3. errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("threads", "error"),
    [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError), ("2", TypeError)],
)
def test_bad_threads(threads: Any, error: type, cpu_xp: Any) -> None:
    cfg, x, _, params = grid.make_case("dot_product", 2, "full", None, batch=1, xp=cpu_xp)
    with pytest.raises(error, match=r"threads must be None or an int >= 1, got"):
        nlref.forward(x, params, cfg, threads=threads)
    with pytest.raises(error, match=r"threads must be None or an int >= 1"):
        engine_threads.resolve_threads(threads, x, 1)


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5"])
def test_bad_num_threads_environment(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NLREF_NUM_THREADS", value)
    message = rf"NLREF_NUM_THREADS must be a positive int, got '{value}'"
    with pytest.raises(ValueError, match=message):
        engine_threads.usable_cpus()
    cfg, x, params = big_case(1, (16, 16))  # large enough for threads=None to ask
    with pytest.raises(ValueError, match=message):
        nlref.forward(x, params, cfg)


def test_cupy_arrays_refuse_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """CuPy arrays run on the calling thread: threads > 1 is an error, None means 1."""
    try:
        import cupy  # noqa: F401
    except ImportError:  # pretend: every array is a CuPy array for the engine's threads
        monkeypatch.setattr(engine_threads.array_api_compat, "is_cupy_array", lambda a: True)
        monkeypatch.setattr(engine_threads.array_api_compat, "is_numpy_array", lambda a: False)
        x = np.zeros((1, C, 4))
    else:
        x = require("cupy").zeros((1, C, 4))
    assert engine_threads.resolve_threads(None, x, 10**9) == 1
    assert engine_threads.resolve_threads(1, x, 10**9) == 1
    with pytest.raises(ValueError, match=r"threads=2 is for NumPy and array-api-strict .*CuPy"):
        engine_threads.resolve_threads(2, x, 1)
    assert engine_threads.default_threads(x, 10**9) == 1
    cfg = nlref.NonLocalConfig(in_channels=C, inter_channels=C_INTER)
    params = nlref.init_params(cfg, xp=array_api_compat.array_namespace(x))
    with pytest.raises(ValueError, match=r"threads=3 is for NumPy and array-api-strict arrays"):
        nlref.forward(x, params, cfg, threads=3)


@pytest.mark.parametrize("library", ["torch", "jax"])
def test_torch_and_jax_arrays_refuse_threads(library: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """PyTorch and JAX run each operation on their own thread pools: threads > 1 is an
    error, and None means 1 however large the problem."""
    host = np.zeros((1, C, 300, 300), dtype=np.float32)  # far above MIN_PARALLEL_ELEMENTS
    x = (
        require("torch").from_numpy(host)
        if library == "torch"
        else require("jax").numpy.asarray(host)
    )
    name = {"torch": "PyTorch", "jax": "JAX"}[library]
    monkeypatch.setenv("NLREF_NUM_THREADS", "4")
    assert engine_threads.resolve_threads(None, x, 10**12) == 1
    assert engine_threads.resolve_threads(1, x, 10**12) == 1
    message = rf"threads=2 is for NumPy and array-api-strict arrays; {name} arrays run on the"
    with pytest.raises(ValueError, match=message + " calling thread"):
        engine_threads.resolve_threads(2, x, 1)


# --- 4. split and run_split -------------------------------------------------------------------


def test_split() -> None:
    for n in range(1, 13):
        items = list(range(100, 100 + n))
        for parts in range(1, 16):
            runs = engine_threads.split(items, parts)
            assert len(runs) == min(parts, n)
            assert [i for r in runs for i in r] == items  # contiguous, in order
            lengths = [len(r) for r in runs]
            assert min(lengths) >= 1  # never empty
            assert max(lengths) - min(lengths) <= 1  # near-equal
    assert engine_threads.split(range(10), 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert engine_threads.split("abc", 5) == [["a"], ["b"], ["c"]]
    assert engine_threads.split([1, 2], 0) == [[1, 2]]  # at least one run


def test_run_split_order_and_threads() -> None:
    """Results come back in run order however the runs finish; one run stays here."""

    def work(run: list[int]) -> tuple[list[int], str]:
        time.sleep(0.01 * (5 - run[0]))  # later runs finish first
        return [i * i for i in run], threading.current_thread().name

    results = engine_threads.run_split(work, range(5), 3)
    assert [r for r, _ in results] == [[0], [1, 4], [9, 16]]
    assert all(name.startswith("nlref") for _, name in results)
    single = engine_threads.run_split(work, range(5), 1)
    assert single == [([0, 1, 4, 9, 16], threading.current_thread().name)]
    assert engine_threads.run_split(lambda r: sum(r), range(3), 8) == [0, 1, 2]


def test_run_split_raises_the_workers_exception() -> None:
    def work(run: list[int]) -> int:
        if 2 in run:
            raise KeyError(f"run {list(run)} failed")
        return len(run)

    with pytest.raises(KeyError, match=r"run \[2\] failed"):
        engine_threads.run_split(work, range(4), 4)
    with pytest.raises(KeyError, match="failed"):
        engine_threads.run_split(work, range(4), 1)  # on the calling thread
    assert engine_threads.run_split(work, [0, 1, 3], 3) == [1, 1, 1]  # the pool still works


def test_region_holds_blas_at_one_thread(blas_two: list) -> None:
    before = blas_threads()
    assert before, "no BLAS library found by threadpoolctl"
    assert before == blas_two
    with engine_threads.region(2):
        assert all(n == 1 for _, n in blas_threads())
        with engine_threads.region(3):  # re-entrant on the same thread
            assert all(n == 1 for _, n in blas_threads())
    assert blas_threads() == before
    with engine_threads.region(1):
        assert blas_threads() == before


# --- 5. an exception in a worker --------------------------------------------------------------


def failing(variant: Any, method: str, inside: list) -> Any:
    """``variant`` whose ``method`` ("forward" or "backward", of the logits step for a
    softmax variant: what the engine runs) raises on its second call, and records the BLAS
    threads seen inside the workers."""
    calls = [0]
    lock = threading.Lock()
    owner = variant.logits if variant.logits is not None else variant
    real = getattr(owner, method)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with lock:
            calls[0] += 1
            nth = calls[0]
        inside.extend(n for _, n in blas_threads())
        if nth == 2:
            raise RuntimeError(f"injected failure in {method}")
        return real(*args, **kwargs)

    owner = dataclasses.replace(owner, **{method: wrapped})
    if variant.logits is not None:
        return dataclasses.replace(variant, logits=owner)
    return owner


@pytest.mark.parametrize("method", ["forward", "backward"])
@pytest.mark.parametrize(
    ("batch", "threads", "chunk_size"),
    [(3, 2, None), (3, 3, 4), (1, 3, None), (2, 2, 4), (1, 2, 4)],
)
def test_worker_exception_propagates(
    batch: int,
    threads: int,
    chunk_size: Any,
    method: str,
    monkeypatch: pytest.MonkeyPatch,
    blas_two: list,
) -> None:
    cfg, x, dz, params = grid.make_case("embedded_gaussian", 2, "pool_after", batch=batch)
    expected = run(x, dz, params, cfg, True, threads=1)
    before = blas_threads()
    assert before == blas_two
    inside: list[int] = []
    patched = failing(nlref.pairwise.get(cfg.pairwise), method, inside)
    monkeypatch.setattr(nlref.engine.run, "get_pairwise", lambda name: patched)

    with pytest.raises(RuntimeError, match=f"injected failure in {method}"):
        _, cache = nlref.forward(x, params, cfg, threads=threads, chunk_size=chunk_size)
        nlref.backward(dz, cache)
    assert inside and all(n == 1 for n in inside), inside  # the limit was on in the workers
    assert blas_threads() == before  # ... and is off again

    # the pool and the region lock are usable afterwards, from another thread too
    monkeypatch.undo()
    box: dict = {}

    def again() -> None:
        box["out"] = run(x, dz, params, cfg, True, threads=threads, chunk_size=chunk_size)

    worker = threading.Thread(target=again)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "a threaded forward hung after a worker's exception"
    assert_same(box["out"], expected, rtol=1e-12, atol=1e-13)
    assert blas_threads() == before


# --- 6. workers bound to CPUs ------------------------------------------------------------------


def _worker_cpus(runs: int) -> list[list[set[int]]]:
    """The CPU set each of ``runs`` workers runs with, seen from inside the worker."""
    return engine_threads.run_split(lambda run: [os.sched_getaffinity(0)], list(range(runs)), runs)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this OS")
def test_workers_bound_one_cpu_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """With binding on (the default), worker i runs on CPU i of the caller's set; with
    NLREF_BIND_THREADS=0, or more workers than CPUs, every worker gets the caller's set
    back (an earlier binding is undone)."""
    allowed = os.sched_getaffinity(0)
    monkeypatch.delenv("NLREF_BIND_THREADS", raising=False)
    assert engine_threads.binds_threads()
    if len(allowed) >= 2:
        seen = _worker_cpus(2)
        assert seen == [[{cpu}] for cpu in sorted(allowed)[:2]]
    else:  # one CPU: two workers are more than the CPUs, so they are not bound
        assert _worker_cpus(2) == [[allowed], [allowed]]
    monkeypatch.setenv("NLREF_BIND_THREADS", "0")
    assert not engine_threads.binds_threads()
    assert _worker_cpus(2) == [[allowed], [allowed]]
    monkeypatch.delenv("NLREF_BIND_THREADS")
    too_many = len(allowed) + 1
    assert all(cpus == [allowed] for cpus in _worker_cpus(too_many))
    assert os.sched_getaffinity(0) == allowed  # the calling thread is never bound


def test_bound_workers_same_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """Binding changes where the workers run, not what they compute: same bits."""
    cfg, x, dz, params = grid.make_case("embedded_gaussian", 2, "full")
    monkeypatch.setenv("NLREF_BIND_THREADS", "1")
    bound = run(x, dz, params, cfg, True, threads=2)
    monkeypatch.setenv("NLREF_BIND_THREADS", "0")
    free = run(x, dz, params, cfg, True, threads=2)
    grid.assert_path(bound["cache"], threads=2)
    grid.assert_identical(bound, free)
