"""CPU threads: ``nlref.forward(..., threads=T)`` and :mod:`nlref.parallel`.

With T threads the block either splits the batch into T contiguous runs, each run's whole
pre-BN computation on its own thread (B ≥ T), or keeps one part and spreads the blocks of
the attention over the threads (B < T: chunks of queries when chunked, row ranges of each
batch element when materialised). Either way the formulas are those of one thread, so:

- every output, gradient and BN buffer equals the one-thread result up to float rounding,
  for every variant, pool order, norm and both attention paths, on NumPy and
  array-api-strict, and the threaded backward passes a float64 gradient check;
- a given thread count gives the same bits on every run, mutates nothing, keeps float32;
- the cache records the split (``cache.parts``, ``cache.threads``), and ``threads=None``
  picks the usable CPUs only for a large enough NumPy block;
- bad ``threads`` / ``NLREF_NUM_THREADS`` and CuPy arrays with ``threads > 1`` are refused;
- an exception in a worker reaches the caller and leaves the BLAS thread limit as it was.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from typing import Any

import array_api_compat
import numpy as np
import pytest
import threadpoolctl

import nlref
from nlref import parallel, perf

from . import block_cases
from .block_cases import C_INTER, C, assert_same, outputs, run
from .conftest import require

SPATIAL, KERNEL = (5, 6), (2, 2)  # N = 30 queries, N′ = 6 keys after pooling
N = 30
SUB_SAMPLES = {
    "none": (False, "after_projection"),
    "after": (True, "after_projection"),
    "before": (True, "before_projection"),
}
NORMS = {"bn_train": ("batchnorm", True), "bn_eval": ("batchnorm", False), "no_norm": (None, True)}
VARIANTS = nlref.pairwise.names()
# (B, threads): B >= threads splits the batch (B=3 over 2 threads: uneven runs 1 + 2),
# B < threads keeps one part and spreads the attention blocks over the threads.
SPLITS = [(3, 2), (3, 3), (1, 3), (2, 3)]
# chunk_size: None materialises; 4 gives 8 chunks (ragged last block of 2); 16 gives 2
# chunks, fewer than 3 threads
PATHS = {"materialised": (None,), "chunked": (4, 16)}
ROWS = [(0, N), (3, 17), (9, 11), (N - 1, N)]  # across the blocks' boundaries


@pytest.fixture(params=["numpy", "array_api_strict"])
def cpu_xp(request: pytest.FixtureRequest) -> Any:
    """The CPU backends threads run on (CuPy arrays always run on the calling thread)."""
    if request.param == "numpy":
        return array_api_compat.array_namespace(np.empty(0))
    return require(request.param)


def make_case(
    pairwise: str,
    sub: str,
    norm: str | None,
    batch: int,
    *,
    dtype: str = "float64",
    xp: Any = None,
    spatial: tuple[int, ...] = SPATIAL,
    kernel: tuple[int, ...] = KERNEL,
) -> tuple[nlref.NonLocalConfig, Any, Any, dict[str, Any]]:
    pooled, order = SUB_SAMPLES[sub]
    return block_cases.make_case(
        pairwise,
        batch,
        spatial,
        kernel if pooled else None,
        order,
        norm,
        seed=f"{pairwise}-{sub}-{norm}-{batch}-{spatial}",
        dtype=dtype,
        xp=xp,
    )


def assert_identical(a: dict, b: dict, msg: str = "") -> None:
    assert outputs(a) == outputs(b), msg
    for name in outputs(a):
        assert a[name].dtype == b[name].dtype, f"{msg}: {name}"
        np.testing.assert_array_equal(a[name], b[name], err_msg=f"{msg}: {name}")


def expected_parts(batch: int, threads: int) -> list[tuple[int, int]]:
    """The batch runs of the batch-split path (near-equal, contiguous), else the batch."""
    if threads > 1 and batch >= threads:
        bounds = [batch * w // threads for w in range(threads + 1)]
        return list(itertools.pairwise(bounds))
    return [(0, batch)]


def blas_threads() -> list[tuple[str, int]]:
    """Threads of the BLAS libraries nlref limits (NumPy's; a BLAS loaded later, such as
    PyTorch's, is not nlref's business)."""
    limited = set(parallel.limited_libraries())
    assert limited, "nlref.parallel limits no BLAS library: NumPy's BLAS was not found"
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


def check_threaded_against_one_thread(
    cfg: Any, x: Any, dz: Any, params: dict, training: bool, batch: int, threads: int
) -> None:
    """Both attention paths: equal results, structure, attention and attention_rows."""
    reference = run(x, dz, params, cfg, training, threads=1, chunk_size=N)
    full = nlref.to_numpy(reference["cache"].attention)  # (B, N, N′)
    atol = 1e-13 * float(np.max(np.abs(full)))
    for path, chunk_sizes in PATHS.items():
        for chunk_size in chunk_sizes:
            msg = f"B={batch} threads={threads} {path} chunk_size={chunk_size}"
            one = run(x, dz, params, cfg, training, threads=1, chunk_size=chunk_size)
            many = run(x, dz, params, cfg, training, threads=threads, chunk_size=chunk_size)
            cache = many["cache"]
            assert cache.threads == threads, msg
            assert cache.plan.materialised == (chunk_size is None), msg
            assert [p.batch for p in cache.parts] == expected_parts(batch, threads), msg
            assert_same(many, one, rtol=1e-12, atol=1e-13, msg=msg)
            if chunk_size is None:
                attention = nlref.to_numpy(cache.attention)
                assert attention.shape == full.shape, msg
                np.testing.assert_allclose(attention, full, rtol=1e-12, atol=atol, err_msg=msg)
            else:
                with pytest.raises(nlref.AttentionNotStoredError, match="attention_rows"):
                    _ = cache.attention
            for start, stop in ROWS:
                rows = nlref.to_numpy(cache.attention_rows(start, stop))
                np.testing.assert_allclose(
                    rows, full[:, start:stop], rtol=1e-12, atol=atol, err_msg=f"{msg} rows"
                )


# --- 1. equal to one thread -------------------------------------------------------------


@pytest.mark.parametrize("norm_id", list(NORMS))
@pytest.mark.parametrize("sub", list(SUB_SAMPLES))
@pytest.mark.parametrize("pairwise", VARIANTS)
def test_threads_equal_one_thread(pairwise: str, sub: str, norm_id: str) -> None:
    """Every variant x pooling x norm x both paths x batch split / block split."""
    norm, training = NORMS[norm_id]
    for batch, threads in SPLITS:
        cfg, x, dz, params = make_case(pairwise, sub, norm, batch)
        check_threaded_against_one_thread(cfg, x, dz, params, training, batch, threads)


@pytest.mark.parametrize("pairwise", VARIANTS)
def test_threads_equal_one_thread_array_api_strict(pairwise: str) -> None:
    """The threaded paths use only the array API (a representative subset)."""
    xp = require("array_api_strict")
    for sub, norm_id in [("before", "bn_train"), ("after", "no_norm")]:
        norm, training = NORMS[norm_id]
        for batch, threads in [(3, 2), (2, 3)]:
            cfg, x, dz, params = make_case(pairwise, sub, norm, batch, xp=xp)
            assert not array_api_compat.is_numpy_array(x)
            check_threaded_against_one_thread(cfg, x, dz, params, training, batch, threads)


@pytest.mark.parametrize("spatial", [(11,), (3, 4, 5)], ids=["1d", "3d"])
def test_threads_equal_one_thread_1d_3d(spatial: tuple[int, ...]) -> None:
    kernel = (2,) if len(spatial) == 1 else (1, 2, 2)
    n = int(np.prod(spatial))
    for batch, threads in SPLITS:
        cfg, x, dz, params = make_case(
            "embedded_gaussian", "after", "batchnorm", batch, spatial=spatial, kernel=kernel
        )
        for chunk_size in (None, 3):
            msg = f"{spatial} B={batch} threads={threads} chunk_size={chunk_size}"
            one = run(x, dz, params, cfg, True, threads=1, chunk_size=chunk_size)
            many = run(x, dz, params, cfg, True, threads=threads, chunk_size=chunk_size)
            assert many["cache"].threads == threads
            assert_same(many, one, rtol=1e-12, atol=1e-13, msg=msg)
            np.testing.assert_allclose(
                nlref.to_numpy(many["cache"].attention_rows(0, n)),
                nlref.to_numpy(one["cache"].attention_rows(0, n)),
                rtol=1e-12,
                atol=1e-15,
                err_msg=msg,
            )


def test_fewer_queries_than_threads() -> None:
    """B=1 with N=2 queries over 3 threads: two row blocks, still exact."""
    cfg, x, dz, params = make_case("dot_product", "none", "batchnorm", 1, spatial=(2,))
    one = run(x, dz, params, cfg, True, threads=1)
    many = run(x, dz, params, cfg, True, threads=3)
    blocks = many["cache"].parts[0].attention_cache.blocks
    assert [blk.queries for blk in blocks] == [(0, 1), (1, 2)]
    assert_same(many, one, rtol=1e-12, atol=1e-13)


# --- 2. gradient check of the threaded path ----------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 4], ids=["materialised", "chunked"])
@pytest.mark.parametrize("batch", [3, 1], ids=["batch_split", "block_split"])
@pytest.mark.parametrize("pairwise", VARIANTS)
def test_threaded_gradcheck(pairwise: str, batch: int, chunk_size: int | None) -> None:
    """Central differences in float64 through forward and backward with threads=2."""
    cfg, x, _, params = make_case(pairwise, "after", "batchnorm", batch)
    names = list(params)
    n_parts = 2 if batch >= 2 else 1
    seen = []

    def fwd(inp: dict[str, Any]) -> tuple[Any, Any]:
        z, cache = nlref.forward(
            inp["x"], {k: inp[k] for k in names}, cfg, chunk_size=chunk_size, threads=2
        )
        seen.append((cache.threads, len(cache.parts), cache.plan.materialised))
        return z, cache

    def bwd(dz: Any, cache: Any) -> dict[str, Any]:
        dx, grads = nlref.backward(dz, cache)
        return {"x": dx, **grads}

    wrt = ["x", *nlref.trainable_names(cfg)]
    result = nlref.gradcheck(fwd, bwd, {"x": x, **params}, wrt=wrt, rng=batch)
    assert result.ok, str(result)
    assert set(result.args) == set(wrt)
    assert set(seen) == {(2, n_parts, chunk_size is None)}


@pytest.mark.parametrize("batch", [3, 1], ids=["batch_split", "block_split"])
def test_threaded_gradcheck_block_default_threads(
    batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gradcheck_block (threads=None) runs threaded once the threshold is lowered."""
    monkeypatch.setattr(parallel, "MIN_PARALLEL_ELEMENTS", 1)
    monkeypatch.setenv("NLREF_NUM_THREADS", "2")
    cfg, x, _, params = make_case("concatenation", "before", "batchnorm", batch)
    _, cache = nlref.forward(x, params, cfg)
    assert cache.threads == 2
    assert len(cache.parts) == (2 if batch >= 2 else 1)
    result = nlref.gradcheck_block(cfg, x, params, rng=1)
    assert result.ok, str(result)


def test_gradcheck_block_passes_chunk_size_and_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """gradcheck_block(chunk_size=, threads=) checks that path: every forward it runs is
    chunked and threaded as asked."""
    cfg, x, _, params = make_case("embedded_gaussian", "after", "batchnorm", 1)
    forward, plans = nlref.block.forward, []

    def recording_forward(*args: Any, **kwargs: Any) -> Any:
        z, cache = forward(*args, **kwargs)
        plans.append((cache.plan.chunk_size, cache.threads))
        return z, cache

    monkeypatch.setattr(nlref.block, "forward", recording_forward)
    result = nlref.gradcheck_block(cfg, x, params, rng=1, chunk_size=4, threads=2)
    assert result.ok, str(result)
    assert plans and set(plans) == {(4, 2)}


# --- 3. determinism, nothing mutated ------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 4], ids=["materialised", "chunked"])
@pytest.mark.parametrize("batch", [3, 1], ids=["batch_split", "block_split"])
@pytest.mark.parametrize("pairwise", VARIANTS)
def test_same_bits_every_run(pairwise: str, batch: int, chunk_size: int | None) -> None:
    cfg, x, dz, params = make_case(pairwise, "after", "batchnorm", batch)
    saved = {"x": x.copy(), "dz": dz.copy(), **{k: v.copy() for k, v in params.items()}}
    first = run(x, dz, params, cfg, True, threads=2, chunk_size=chunk_size)
    for _ in range(3):
        again = run(x, dz, params, cfg, True, threads=2, chunk_size=chunk_size)
        assert_identical(again, first, msg="second forward and backward")
    # backward twice on one cache (the in-place sums over blocks must not touch the cache)
    dx, grads = nlref.backward(dz, first["cache"])
    assert_identical(
        {"dx": nlref.to_numpy(dx), **{k: nlref.to_numpy(v) for k, v in grads.items()}},
        {k: first[k] for k in ["dx", *grads]},
        msg="backward on the same cache",
    )
    np.testing.assert_array_equal(x, saved["x"])
    np.testing.assert_array_equal(dz, saved["dz"])
    for name, value in params.items():
        np.testing.assert_array_equal(value, saved[name], err_msg=name)


# --- 4. float32 ---------------------------------------------------------------------------


@pytest.mark.parametrize("pairwise", VARIANTS)
def test_float32_stays_float32(pairwise: str) -> None:
    for batch, threads in [(3, 2), (1, 3)]:
        cfg, x, dz, params = make_case(pairwise, "after", "batchnorm", batch, dtype="float32")
        for chunk_size in (None, 7):
            msg = f"B={batch} threads={threads} chunk_size={chunk_size}"
            one = run(x, dz, params, cfg, True, threads=1, chunk_size=chunk_size)
            many = run(x, dz, params, cfg, True, threads=threads, chunk_size=chunk_size)
            assert many["cache"].threads == threads
            for name in outputs(many):
                assert many[name].dtype == np.float32, f"{msg}: {name} is {many[name].dtype}"
            assert many["cache"].attention_rows(2, 9).dtype == np.float32
            if chunk_size is None:
                assert many["cache"].attention.dtype == np.float32
            assert_same(many, one, rtol=1e-5, atol=1e-6, msg=msg)


# --- 5. structure and the default thread count --------------------------------------------


@pytest.mark.parametrize(
    ("batch", "threads", "runs"),
    [(3, 2, [(0, 1), (1, 3)]), (3, 3, [(0, 1), (1, 2), (2, 3)]), (5, 3, [(0, 1), (1, 3), (3, 5)])],
)
@pytest.mark.parametrize("chunk_size", [None, 4], ids=["materialised", "chunked"])
def test_batch_split_parts(batch: int, threads: int, runs: list, chunk_size: int | None) -> None:
    cfg, x, dz, params = make_case("embedded_gaussian", "after", "batchnorm", batch)
    z, cache = nlref.forward(x, params, cfg, threads=threads, chunk_size=chunk_size)
    assert cache.threads == threads
    assert [part.batch for part in cache.parts] == runs
    n_chunks = 1 if chunk_size is None else -(-N // chunk_size)
    for part in cache.parts:
        b = part.batch[1] - part.batch[0]
        core = part.attention_cache
        assert core.threads == 1  # each run's attention on its own thread
        assert tuple(core.theta.shape) == (b, C_INTER, N)
        assert tuple(core.values.shape) == (b, C_INTER, 6)
        assert len(core.blocks) == n_chunks
        assert all(blk.batch == (0, b) for blk in core.blocks)  # local to the part
        assert core.stored == (chunk_size is None)
    assert tuple(cache.values.shape) == (batch, C_INTER, 6)
    dx, _ = nlref.backward(dz, cache)
    assert tuple(dx.shape) == tuple(z.shape) == tuple(x.shape)


@pytest.mark.parametrize(
    ("batch", "threads", "chunk_size", "blocks"),
    [
        (1, 3, None, [((0, 1), (0, 10)), ((0, 1), (10, 20)), ((0, 1), (20, 30))]),
        (
            2,
            3,
            None,
            [((0, 1), (0, 15)), ((0, 1), (15, 30)), ((1, 2), (0, 15)), ((1, 2), (15, 30))],
        ),
        (2, 3, 13, [((0, 2), (0, 13)), ((0, 2), (13, 26)), ((0, 2), (26, 30))]),
        (1, 1, None, [((0, 1), (0, 30))]),
        (3, 1, None, [((0, 3), (0, 30))]),
    ],
)
def test_block_split_blocks(batch: int, threads: int, chunk_size: Any, blocks: list) -> None:
    cfg, x, _, params = make_case("dot_product", "after", "batchnorm", batch)
    _, cache = nlref.forward(x, params, cfg, threads=threads, chunk_size=chunk_size)
    assert cache.threads == threads
    assert len(cache.parts) == 1 and cache.parts[0].batch == (0, batch)
    core = cache.parts[0].attention_cache
    assert core.threads == threads
    assert [(blk.batch, blk.queries) for blk in core.blocks] == blocks
    assert all((blk.attention is not None) == (chunk_size is None) for blk in core.blocks)


def test_workers_really_run_on_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both split modes hand the attention to nlref's worker threads (not the caller)."""
    names: list[str] = []
    lock = threading.Lock()

    def recording(variant: Any) -> Any:
        def forward(*args: Any) -> Any:
            with lock:
                names.append(threading.current_thread().name)
            time.sleep(0.02)  # let the other worker start meanwhile
            return variant.forward(*args)

        return dataclasses.replace(variant, forward=forward)

    real_get = nlref.block.get_pairwise
    monkeypatch.setattr(nlref.block, "get_pairwise", lambda name: recording(real_get(name)))
    for batch in (3, 1):
        cfg, x, _, params = make_case("embedded_gaussian", "none", "batchnorm", batch)
        names.clear()
        nlref.forward(x, params, cfg, threads=2)
        assert len(names) == 2
        assert all(name.startswith("nlref") for name in names), names
        assert len(set(names)) == 2, names
        names.clear()
        nlref.forward(x, params, cfg, threads=1)
        assert names == [threading.current_thread().name]


def big_case(batch: int, spatial: tuple[int, ...], xp: Any = None) -> tuple[Any, Any, Any]:
    cfg = nlref.NonLocalConfig(in_channels=C, inter_channels=C_INTER)
    params = nlref.init_params(cfg, rng=0, scheme="random", xp=xp)
    x = np.random.default_rng(1).standard_normal((batch, C, *spatial))
    return cfg, (x if xp is None else xp.asarray(x)), params


@pytest.mark.parametrize(
    ("batch", "spatial", "expected", "n_parts"),
    [
        (1, (16, 16), 2, 1),  # B·N·N′ = 65536 = MIN_PARALLEL_ELEMENTS
        (1, (15, 17), 1, 1),  # 65025
        (2, (12, 12), 1, 1),  # 41472
        (4, (12, 12), 2, 2),  # 82944: B >= threads, the batch is split
    ],
)
def test_default_threads(
    batch: int,
    spatial: tuple,
    expected: int,
    n_parts: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NLREF_NUM_THREADS", "2")
    assert parallel.usable_cpus() == 2
    cfg, x, params = big_case(batch, spatial)
    n = int(np.prod(spatial))
    assert parallel.default_threads(x, batch * n * n) == expected
    _, cache = nlref.forward(x, params, cfg)
    assert cache.threads == expected
    assert len(cache.parts) == n_parts


def test_default_threads_usable_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without NLREF_NUM_THREADS: the CPUs of the affinity mask, on a large NumPy block."""
    monkeypatch.delenv("NLREF_NUM_THREADS", raising=False)
    cpus = parallel.usable_cpus()
    assert cpus >= 1
    if hasattr(parallel.os, "sched_getaffinity"):
        assert cpus == len(parallel.os.sched_getaffinity(0))
    cfg, x, params = big_case(1, (16, 16))
    _, cache = nlref.forward(x, params, cfg)
    assert cache.threads == min(cpus, cache.plan.concurrent) == cpus
    cfg, x, params = big_case(1, (3, 3))  # tiny: one thread
    _, cache = nlref.forward(x, params, cfg)
    assert cache.threads == 1
    assert parallel.default_threads(x, parallel.MIN_PARALLEL_ELEMENTS - 1) == 1
    assert parallel.default_threads(x, parallel.MIN_PARALLEL_ELEMENTS) == cpus


def test_default_threads_array_api_strict(monkeypatch: pytest.MonkeyPatch) -> None:
    xp = require("array_api_strict")
    monkeypatch.setenv("NLREF_NUM_THREADS", "2")
    cfg, x, params = big_case(1, (16, 16), xp=xp)
    assert parallel.default_threads(x, 10**9) == 1
    _, cache = nlref.forward(x, params, cfg)
    assert cache.threads == 1
    _, cache = nlref.forward(x, params, cfg, threads=2)  # explicit threads do run
    assert cache.threads == 2


def test_explicit_threads_ignore_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NLREF_NUM_THREADS", "abc")
    cfg, x, params = big_case(1, (16, 16))
    _, cache = nlref.forward(x, params, cfg, threads=3)
    assert cache.threads == 3


def test_memory_fallback_records_fewer_threads() -> None:
    """When only one block at a time fits, the plan falls back to one: cache.threads says."""
    cfg, x, dz, params = make_case("dot_product", "none", "batchnorm", 1)
    dims = (1, C, C_INTER, N, N, 8)
    limit = perf.working_set_bytes(*dims, 1, 1)  # one row, one block at a time
    assert perf.working_set_bytes(*dims, 1, 2) > limit
    out = run(x, dz, params, cfg, True, threads=2, memory_limit=limit)
    cache = out["cache"]
    assert cache.plan.concurrent == 1 and cache.plan.chunk_size == 1
    assert cache.threads == 1
    assert_same(out, run(x, dz, params, cfg, True, threads=1), rtol=1e-12, atol=1e-13)


def test_memory_fallback_with_a_given_chunk_size() -> None:
    """A given chunk_size that fits one block at a time but not two runs on one thread
    instead of raising; one that does not fit even alone still raises."""
    cfg, x, dz, params = make_case("embedded_gaussian", "none", "batchnorm", 1)
    dims = (1, C, C_INTER, N, N, 8)
    limit = perf.working_set_bytes(*dims, 4, 1)
    assert perf.working_set_bytes(*dims, 4, 2) > limit
    out = run(x, dz, params, cfg, True, threads=2, chunk_size=4, memory_limit=limit)
    assert out["cache"].plan.concurrent == 1 and out["cache"].plan.chunk_size == 4
    assert out["cache"].threads == 1
    one = run(x, dz, params, cfg, True, threads=1, chunk_size=4)
    assert_same(out, one, rtol=1e-12, atol=1e-13)
    with pytest.raises(nlref.MemoryLimitError, match="chunk_size=8"):
        nlref.forward(x, params, cfg, threads=2, chunk_size=8, memory_limit=limit)


# --- 6. errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("threads", "error"),
    [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError), ("2", TypeError)],
)
def test_bad_threads(threads: Any, error: type, cpu_xp: Any) -> None:
    cfg, x, _, params = make_case("dot_product", "none", None, 1, xp=cpu_xp)
    with pytest.raises(error, match=r"threads must be None or an int >= 1, got"):
        nlref.forward(x, params, cfg, threads=threads)
    with pytest.raises(error, match=r"threads must be None or an int >= 1"):
        parallel.resolve_threads(threads, x, 1)


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5"])
def test_bad_num_threads_environment(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NLREF_NUM_THREADS", value)
    message = rf"NLREF_NUM_THREADS must be a positive int, got '{value}'"
    with pytest.raises(ValueError, match=message):
        parallel.usable_cpus()
    cfg, x, params = big_case(1, (16, 16))  # large enough for threads=None to ask
    with pytest.raises(ValueError, match=message):
        nlref.forward(x, params, cfg)


def test_cupy_arrays_refuse_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """CuPy arrays run on the calling thread: threads > 1 is an error, None means 1."""
    try:
        import cupy  # noqa: F401
    except ImportError:  # pretend: every array is a CuPy array for nlref.parallel
        monkeypatch.setattr(parallel.array_api_compat, "is_cupy_array", lambda a: True)
        monkeypatch.setattr(parallel.array_api_compat, "is_numpy_array", lambda a: False)
        x = np.zeros((1, C, 4))
    else:
        x = require("cupy").zeros((1, C, 4))
    assert parallel.resolve_threads(None, x, 10**9) == 1
    assert parallel.resolve_threads(1, x, 10**9) == 1
    with pytest.raises(ValueError, match=r"threads=2 is for CPU arrays; CuPy"):
        parallel.resolve_threads(2, x, 1)
    assert parallel.default_threads(x, 10**9) == 1
    cfg = nlref.NonLocalConfig(in_channels=C, inter_channels=C_INTER)
    params = nlref.init_params(cfg, xp=array_api_compat.array_namespace(x))
    with pytest.raises(ValueError, match=r"threads=3 is for CPU arrays"):
        nlref.forward(x, params, cfg, threads=3)


# --- 7. split and run_split ---------------------------------------------------------------


def test_split() -> None:
    for n in range(1, 13):
        items = list(range(100, 100 + n))
        for parts in range(1, 16):
            runs = parallel.split(items, parts)
            assert len(runs) == min(parts, n)
            assert [i for r in runs for i in r] == items  # contiguous, in order
            lengths = [len(r) for r in runs]
            assert min(lengths) >= 1  # never empty
            assert max(lengths) - min(lengths) <= 1  # near-equal
    assert parallel.split(range(10), 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert parallel.split("abc", 5) == [["a"], ["b"], ["c"]]
    assert parallel.split([1, 2], 0) == [[1, 2]]  # at least one run


def test_run_split_order_and_threads() -> None:
    """Results come back in run order however the runs finish; one run stays here."""

    def work(run: list[int]) -> tuple[list[int], str]:
        time.sleep(0.01 * (5 - run[0]))  # later runs finish first
        return [i * i for i in run], threading.current_thread().name

    results = parallel.run_split(work, range(5), 3)
    assert [r for r, _ in results] == [[0], [1, 4], [9, 16]]
    assert all(name.startswith("nlref") for _, name in results)
    single = parallel.run_split(work, range(5), 1)
    assert single == [([0, 1, 4, 9, 16], threading.current_thread().name)]
    assert parallel.run_split(lambda r: sum(r), range(3), 8) == [0, 1, 2]


def test_run_split_raises_the_workers_exception() -> None:
    def work(run: list[int]) -> int:
        if 2 in run:
            raise KeyError(f"run {run} failed")
        return len(run)

    with pytest.raises(KeyError, match=r"run \[2\] failed"):
        parallel.run_split(work, range(4), 4)
    with pytest.raises(KeyError, match="failed"):
        parallel.run_split(work, range(4), 1)  # on the calling thread
    assert parallel.run_split(work, [0, 1, 3], 3) == [1, 1, 1]  # the pool still works


def test_region_holds_blas_at_one_thread(blas_two: list) -> None:
    before = blas_threads()
    assert before, "no BLAS library found by threadpoolctl"
    assert before == blas_two
    with parallel.region(2):
        assert all(n == 1 for _, n in blas_threads())
        with parallel.region(3):  # re-entrant on the same thread
            assert all(n == 1 for _, n in blas_threads())
    assert blas_threads() == before
    with parallel.region(1):
        assert blas_threads() == before


# --- 8. an exception in a worker ----------------------------------------------------------


def failing(variant: Any, method: str, inside: list) -> Any:
    """``variant`` whose ``method`` raises on its second call (and records the BLAS
    threads seen inside the workers)."""
    calls = [0]
    lock = threading.Lock()
    real = getattr(variant, method)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with lock:
            calls[0] += 1
            nth = calls[0]
        inside.extend(n for _, n in blas_threads())
        if nth == 2:
            raise RuntimeError(f"injected failure in {method}")
        return real(*args, **kwargs)

    return dataclasses.replace(variant, **{method: wrapped})


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
    cfg, x, dz, params = make_case("embedded_gaussian", "after", "batchnorm", batch)
    expected = run(x, dz, params, cfg, True, threads=1)
    before = blas_threads()
    assert before == blas_two
    inside: list[int] = []
    real_get = nlref.block.get_pairwise
    patched = failing(real_get(cfg.pairwise), method, inside)
    monkeypatch.setattr(nlref.block, "get_pairwise", lambda name: patched)

    with pytest.raises(RuntimeError, match=f"injected failure in {method}"):
        _, cache = nlref.forward(x, params, cfg, threads=threads, chunk_size=chunk_size)
        nlref.backward(dz, cache)
    assert inside and all(n == 1 for n in inside), inside  # the limit was on in the workers
    assert blas_threads() == before  # ... and is off again

    # the pool and the region lock are usable afterwards, from another thread too
    monkeypatch.setattr(nlref.block, "get_pairwise", real_get)
    box: dict = {}

    def again() -> None:
        box["out"] = run(x, dz, params, cfg, True, threads=threads, chunk_size=chunk_size)

    worker = threading.Thread(target=again)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "a threaded forward hung after a worker's exception"
    assert_same(box["out"], expected, rtol=1e-12, atol=1e-13)
    assert blas_threads() == before


# --- 9. workers bound to CPUs ------------------------------------------------------------------


def _worker_cpus(runs: int) -> list[set[int]]:
    """The CPU set each of ``runs`` workers runs with, seen from inside the worker."""
    import os

    return parallel.run_split(lambda run: [os.sched_getaffinity(0)], list(range(runs)), runs)


def test_workers_bound_one_cpu_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """With binding on (the default), worker i runs on CPU i of the caller's set; with
    NLREF_BIND_THREADS=0, or more workers than CPUs, every worker gets the caller's set
    back (an earlier binding is undone)."""
    import os

    allowed = os.sched_getaffinity(0)
    monkeypatch.delenv("NLREF_BIND_THREADS", raising=False)
    assert parallel.binds_threads()
    if len(allowed) >= 2:
        seen = _worker_cpus(2)
        assert seen == [[{cpu}] for cpu in sorted(allowed)[:2]]
    else:  # one CPU: two workers are more than the CPUs, so they are not bound
        assert _worker_cpus(2) == [[allowed], [allowed]]
    monkeypatch.setenv("NLREF_BIND_THREADS", "0")
    assert not parallel.binds_threads()
    assert _worker_cpus(2) == [[allowed], [allowed]]
    monkeypatch.delenv("NLREF_BIND_THREADS")
    too_many = len(allowed) + 1
    assert all(cpus == [allowed] for cpus in _worker_cpus(too_many))
    assert os.sched_getaffinity(0) == allowed  # the calling thread is never bound


def test_bound_workers_same_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """Binding changes where the workers run, not what they compute: same bits."""
    cfg, x, dz, params = make_case("embedded_gaussian", "none", "batchnorm", 2)
    monkeypatch.setenv("NLREF_BIND_THREADS", "1")
    bound = run(x, dz, params, cfg, True, threads=2)
    monkeypatch.setenv("NLREF_BIND_THREADS", "0")
    free = run(x, dz, params, cfg, True, threads=2)
    assert_same(bound, free, rtol=0.0, atol=0.0)
