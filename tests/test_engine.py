"""The engine pinned to the reference.

:mod:`nlref.block` is the Non-local block as plain formulas; :mod:`nlref.engine` runs the
same steps in tiles of queries and on worker threads, with the softmax in place on arrays
it made itself. This file is the proof that the two compute the same thing:

- with one tile and one thread the engine is the reference **bit for bit**: z, dx, every
  gradient (in the same order), the attention, g and the updated BN buffers, for every
  variant × 1D/2D/3D × pooling × norm, on every backend of the ``xp`` fixture;
- with tiles (chunk sizes 1, ragged, N − 1, ≥ N) and threads (1, 2, 3; runs of the batch
  and tiles spread over threads) it agrees with the reference to float rounding, and so do
  ``cache.attention`` and ``cache.attention_rows``: every variant × dims × pooling × norm ×
  chunk size × thread split on NumPy, and on array-api-strict every point with every
  chunk size on one thread and with threads in turn (see ``STRICT_SPLITS``);
- the engine's backward passes float64 gradient checks on its own; it is deterministic,
  mutates nothing it was given, keeps float32; its runs and tiles are laid out as
  documented;
- the reference path takes no engine options: neither :mod:`nlref.block` (its forward,
  backward and steps), nor the layers, nor the variants have ``chunk_size``, ``threads``,
  ``overwrite_input``, ``rows`` or the like.

The memory plan, the threads and the cost model have their own files
(``test_engine_memory.py``, ``test_engine_threads.py``, ``test_engine_cost.py``).
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import pkgutil
from typing import Any

import array_api_compat
import numpy as np
import pytest

import nlref
from nlref import engine
from nlref.engine.inplace import RowStats

from . import grid
from .grid import C_INTER, NORMS, SUB_SAMPLES, VARIANTS, N, assert_same, outputs, run

# chunk_size: 1 (a tile per query), 4 (a ragged last tile of 2), N - 1 (a last tile of 1),
# N (all queries at once: materialised)
CHUNKS = {"1": 1, "ragged": 4, "N-1": N - 1, "N": N}
# (B, threads): the batch split over the threads (B >= threads; 3 over 2 is uneven), or
# one run whose tiles go to the threads (B < threads)
SPLITS = {"one_thread": (3, 1), "batch_2": (3, 2), "batch_3": (3, 3), "tiles_3": (2, 3)}
# array-api-strict's wrappers hold the GIL, so its worker threads mostly wait for each
# other: there, one thread runs every chunk size (on one batch element), and threads 2
# (batch split) and 3 (tile split) each run one chunk size other than 1, in turn over the
# pooling × norm points, so that every variant × dims × chunk size × split still occurs
# (three times)
STRICT_SPLITS = {"one_thread": (1, 1), "batch_2": (2, 2), "tiles_3": (2, 3)}
STRICT_THREAD_CHUNKS = ["ragged", "N-1", "N"]
ROWS = [(0, N), (3, 17), (9, 11), (N - 1, N)]  # across the tiles' boundaries


def one_tile_plan(x: Any, cfg: nlref.NonLocalConfig) -> engine.Plan:
    """The plan of one tile (the attention materialised) and one thread."""
    plan = engine.plan(x, cfg, threads=1)
    assert plan.materialised and plan.n_tiles == 1 and not plan.uses_engine
    return plan


def expected_runs(batch: int, threads: int) -> list[tuple[int, int]]:
    """The batch runs of the batch split (near-equal, contiguous), else the whole batch."""
    if threads > 1 and batch >= threads:
        bounds = [batch * w // threads for w in range(threads + 1)]
        return list(itertools.pairwise(bounds))
    return [(0, batch)]


# --- 1. one tile, one thread: the reference, bit for bit ------------------------------------


@grid.EVERY_POINT
def test_one_tile_one_thread_is_the_reference_bit_for_bit(
    pairwise: str, dims: int, sub: str, norm_id: str, xp: Any
) -> None:
    norm, training = NORMS[norm_id]
    cfg, x, dz, params = grid.make_case(pairwise, dims, sub, norm, xp=xp)
    z_ref, ref = nlref.forward(x, params, cfg, training=training)
    assert isinstance(ref, nlref.BlockCache)  # small enough: the reference path itself
    z, cache = engine.forward(x, params, cfg, training, one_tile_plan(x, cfg))
    assert isinstance(cache, engine.EngineCache)
    (run_,) = cache.runs
    assert run_.batch == (0, x.shape[0]) and run_.attention.stored
    assert len(run_.attention.tiles) == 1 and cache.threads == 1
    if nlref.pairwise.get(pairwise).softmax:  # the engine's in-place softmax did run
        assert isinstance(run_.attention.tiles[0].state[1], RowStats)
    dx_ref, grads_ref = nlref.backward(dz, ref)
    dx, grads = nlref.backward(dz, cache)

    assert list(grads) == list(grads_ref) == list(nlref.trainable_names(cfg))
    assert list(cache.updated_buffers) == list(ref.updated_buffers)
    pairs = {
        "z": (z, z_ref),
        "dx": (dx, dx_ref),
        "attention": (cache.attention, ref.attention),
        "attention_rows": (cache.attention_rows(3, 17), ref.attention_rows(3, 17)),
        "values": (cache.values, ref.values),
        **{f"grad {n}": (grads[n], grads_ref[n]) for n in grads},
        **{n: (v, ref.updated_buffers[n]) for n, v in cache.updated_buffers.items()},
    }
    for name, (got, want) in pairs.items():
        assert type(got) is type(want), name
        assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape), name
        assert np.array_equal(grid.host(got), grid.host(want)), f"{name} differs"


def test_forward_hands_over_only_for_tiles_or_threads() -> None:
    """nlref.forward runs the reference path for one tile and one thread, and hands the
    block to the engine for tiles or threads."""
    cfg, x, dz, params = grid.make_case("embedded_gaussian", 2, "pool_after")
    for kw in [{}, {"chunk_size": N, "threads": 1}, {"chunk_size": 10**6}]:
        _, cache = nlref.forward(x, params, cfg, **kw)
        assert isinstance(cache, nlref.BlockCache), kw
        assert not engine.plan(x, cfg, **kw).uses_engine
    for kw in [{"chunk_size": N - 1}, {"threads": 2}, {"chunk_size": 5, "threads": 2}]:
        _, cache = nlref.forward(x, params, cfg, **kw)
        assert isinstance(cache, engine.EngineCache), kw
        assert cache.plan.uses_engine, kw
        planned = engine.plan(x, cfg, **kw)
        assert (cache.plan.chunk_size, cache.threads) == (planned.chunk_size, planned.threads)
    with pytest.raises(TypeError, match="cache must be"):
        nlref.backward(dz, object())


# --- 2. tiles and threads: the reference to float rounding ----------------------------------


def check_against_reference(
    cfg: Any,
    x: Any,
    dz: Any,
    params: dict,
    training: bool,
    batch: int,
    threads: int,
    chunks: dict[str, int] = CHUNKS,
    reference: dict | None = None,
) -> None:
    """Each chunk size with ``threads``: the reference's results (``reference``, or run
    here), attention and rows."""
    reference = reference or run(x, dz, params, cfg, training)
    assert isinstance(reference["cache"], nlref.BlockCache)
    full = nlref.to_numpy(reference["cache"].attention)  # (B, N, N′)
    atol = 1e-15 * float(np.max(np.abs(full)))
    for chunk_id, chunk_size in chunks.items():
        msg = f"B={batch} threads={threads} chunk_size={chunk_size}"
        got = run(x, dz, params, cfg, training, threads=threads, chunk_size=chunk_size)
        cache = got["cache"]
        materialised = chunk_id == "N"
        if materialised and threads == 1:
            assert isinstance(cache, nlref.BlockCache), msg  # the reference path itself
            grid.assert_identical(got, reference, msg)
            continue
        assert cache.threads == threads, msg
        assert cache.plan.materialised == materialised, msg
        assert cache.plan.n_tiles == (1 if materialised else -(-N // chunk_size)), msg
        assert [r.batch for r in cache.runs] == expected_runs(batch, threads), msg
        assert_same(got, reference, rtol=1e-12, atol=1e-13, msg=msg)
        if materialised:
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


@grid.EVERY_POINT
def test_tiles_and_threads_agree_with_the_reference(
    pairwise: str, dims: int, sub: str, norm_id: str, cpu_xp: Any
) -> None:
    """Every variant × dims × pooling × norm × chunk size × thread split."""
    norm, training = NORMS[norm_id]
    strict = not array_api_compat.is_numpy_namespace(cpu_xp)
    point = list(SUB_SAMPLES).index(sub) * len(NORMS) + list(NORMS).index(norm_id)
    cases: dict[int, tuple] = {}  # batch -> the case and the reference's results
    for turn, (batch, threads) in enumerate((STRICT_SPLITS if strict else SPLITS).values()):
        if batch not in cases:
            case = grid.make_case(pairwise, dims, sub, norm, batch=batch, xp=cpu_xp)
            cases[batch] = (case, run(case[1], case[2], case[3], case[0], training))
        (cfg, x, dz, params), reference = cases[batch]
        chunks = CHUNKS
        if strict and threads > 1:
            chunk_id = STRICT_THREAD_CHUNKS[(point + turn) % len(STRICT_THREAD_CHUNKS)]
            chunks = {chunk_id: CHUNKS[chunk_id]}
        check_against_reference(
            cfg, x, dz, params, training, batch, threads, chunks, reference=reference
        )


@pytest.mark.parametrize("pairwise", VARIANTS)
def test_tiles_on_every_backend(pairwise: str, xp: Any) -> None:
    """The tiled path (one thread) on every backend of the ``xp`` fixture, CuPy included."""
    cfg, x, dz, params = grid.make_case(pairwise, 2, "pool_before", xp=xp)
    full = run(x, dz, params, cfg, True)
    tiled = run(x, dz, params, cfg, True, chunk_size=3)
    assert not tiled["cache"].plan.materialised
    assert_same(tiled, full, rtol=1e-12, atol=1e-13)


def test_fewer_queries_than_threads() -> None:
    """B=1 with N=2 queries over 3 threads: two tiles of one row, still exact."""
    cfg, x, dz, params = grid.make_case("dot_product", sub="full", batch=1, spatial=(2,))
    one = run(x, dz, params, cfg, True, threads=1)
    many = run(x, dz, params, cfg, True, threads=3)
    tiles = many["cache"].runs[0].attention.tiles
    assert [tile.queries for tile in tiles] == [(0, 1), (1, 2)]
    assert_same(many, one, rtol=1e-12, atol=1e-13)


# --- 3. gradient checks of the engine --------------------------------------------------------


@pytest.mark.parametrize("sub", list(SUB_SAMPLES))
@pytest.mark.parametrize("pairwise", VARIANTS)
def test_tiled_gradcheck(pairwise: str, sub: str) -> None:
    """Central differences in float64 through the tiled forward and backward."""
    cfg, x, _, params = grid.make_case(pairwise, 2, sub)
    names = list(params)

    def fwd(inp: dict[str, Any]) -> tuple[Any, Any]:
        return nlref.forward(inp["x"], {k: inp[k] for k in names}, cfg, chunk_size=4)

    def bwd(dz: Any, cache: Any) -> dict[str, Any]:
        assert not cache.plan.materialised
        dx, grads = nlref.backward(dz, cache)
        return {"x": dx, **grads}

    wrt = ["x", *nlref.trainable_names(cfg)]
    result = nlref.gradcheck(fwd, bwd, {"x": x, **params}, wrt=wrt)
    assert result.ok, str(result)


@pytest.mark.parametrize("chunk_size", [None, 4], ids=["materialised", "tiled"])
@pytest.mark.parametrize("batch", [3, 1], ids=["batch_split", "tile_split"])
@pytest.mark.parametrize("pairwise", VARIANTS)
def test_threaded_gradcheck(pairwise: str, batch: int, chunk_size: int | None) -> None:
    """Central differences in float64 through forward and backward with threads=2."""
    cfg, x, _, params = grid.make_case(pairwise, 2, "pool_after", batch=batch)
    names = list(params)
    n_runs = 2 if batch >= 2 else 1
    seen = []

    def fwd(inp: dict[str, Any]) -> tuple[Any, Any]:
        z, cache = nlref.forward(
            inp["x"], {k: inp[k] for k in names}, cfg, chunk_size=chunk_size, threads=2
        )
        seen.append((cache.threads, len(cache.runs), cache.plan.materialised))
        return z, cache

    def bwd(dz: Any, cache: Any) -> dict[str, Any]:
        dx, grads = nlref.backward(dz, cache)
        return {"x": dx, **grads}

    wrt = ["x", *nlref.trainable_names(cfg)]
    result = nlref.gradcheck(fwd, bwd, {"x": x, **params}, wrt=wrt, rng=batch)
    assert result.ok, str(result)
    assert set(result.args) == set(wrt)
    assert set(seen) == {(2, n_runs, chunk_size is None)}


@pytest.mark.parametrize("batch", [3, 1], ids=["batch_split", "tile_split"])
def test_threaded_gradcheck_block_default_threads(
    batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gradcheck_block (threads=None) runs threaded once the threshold is lowered."""
    monkeypatch.setattr(engine.threads, "MIN_PARALLEL_ELEMENTS", 1)
    monkeypatch.setenv("NLREF_NUM_THREADS", "2")
    cfg, x, _, params = grid.make_case("concatenation", 2, "pool_before", batch=batch)
    _, cache = nlref.forward(x, params, cfg)
    assert cache.threads == 2
    assert len(cache.runs) == (2 if batch >= 2 else 1)
    result = nlref.gradcheck_block(cfg, x, params, rng=1)
    assert result.ok, str(result)


def test_gradcheck_block_passes_chunk_size_and_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """gradcheck_block(chunk_size=, threads=) checks that path: every forward it runs is
    tiled and threaded as asked."""
    cfg, x, _, params = grid.make_case("embedded_gaussian", 2, "pool_after", batch=1)
    forward, plans = nlref.api.forward, []

    def recording_forward(*args: Any, **kwargs: Any) -> Any:
        z, cache = forward(*args, **kwargs)
        plans.append((cache.plan.chunk_size, cache.threads))
        return z, cache

    monkeypatch.setattr(nlref.api, "forward", recording_forward)
    result = nlref.gradcheck_block(cfg, x, params, rng=1, chunk_size=4, threads=2)
    assert result.ok, str(result)
    assert plans and set(plans) == {(4, 2)}


# --- 4. determinism, nothing mutated, float32 -----------------------------------------------


@pytest.mark.parametrize(
    ("chunk_size", "threads"),
    [(None, 1), (5, 1), (None, 2), (4, 2)],
    ids=["reference", "tiled", "threaded", "tiled_threaded"],
)
@pytest.mark.parametrize("batch", [3, 1], ids=["batch_split", "tile_split"])
@pytest.mark.parametrize("pairwise", VARIANTS)
def test_same_bits_every_run_nothing_mutated(
    pairwise: str, batch: int, chunk_size: int | None, threads: int
) -> None:
    """The same bits on every run and on every backward of one cache; x, params, dz, z and
    the cache survive (the engine works in place only in memory it made itself)."""
    cfg, x, dz, params = grid.make_case(pairwise, 2, "pool_after", batch=batch)
    for a in [x, dz, *params.values()]:  # an in-place write into any input now raises
        a.flags.writeable = False
    saved = {"x": x.copy(), "dz": dz.copy(), **{k: v.copy() for k, v in params.items()}}
    first = run(x, dz, params, cfg, True, threads=threads, chunk_size=chunk_size)
    z, cache = nlref.forward(x, params, cfg, threads=threads, chunk_size=chunk_size)
    grid.assert_path(cache, chunk_size, threads)
    z_copy = z.copy()
    for _ in range(3):
        again = run(x, dz, params, cfg, True, threads=threads, chunk_size=chunk_size)
        grid.assert_identical(again, first, msg="another forward and backward")
        dx, grads = nlref.backward(dz, cache)  # backward again on one cache
        grid.assert_identical(
            {"dx": nlref.to_numpy(dx), **{k: nlref.to_numpy(v) for k, v in grads.items()}},
            {k: first[k] for k in ["dx", *grads]},
            msg="backward on the same cache",
        )
    np.testing.assert_array_equal(z, z_copy)
    np.testing.assert_array_equal(x, saved["x"])
    np.testing.assert_array_equal(dz, saved["dz"])
    for name, value in params.items():
        np.testing.assert_array_equal(value, saved[name], err_msg=name)


@pytest.mark.parametrize("pairwise", VARIANTS)
def test_float32_stays_float32(pairwise: str) -> None:
    """float32 in, float32 out on every path (no silent upcast), close to the reference."""
    for batch, threads in [(3, 1), (3, 2), (1, 3)]:
        cfg, x, dz, params = grid.make_case(pairwise, 2, "pool_after", batch=batch, dtype="float32")
        reference = run(x, dz, params, cfg, True)
        for chunk_size in (None, 7):
            msg = f"B={batch} threads={threads} chunk_size={chunk_size}"
            got = run(x, dz, params, cfg, True, threads=threads, chunk_size=chunk_size)
            grid.assert_path(got["cache"], chunk_size, threads)
            for name in outputs(got):
                assert got[name].dtype == np.float32, f"{msg}: {name} is {got[name].dtype}"
            assert got["cache"].attention_rows(2, 9).dtype == np.float32
            if chunk_size is None:
                assert got["cache"].attention.dtype == np.float32
            assert_same(got, reference, rtol=1e-5, atol=1e-6, msg=msg)


# --- 5. runs and tiles ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "threads", "runs"),
    [(3, 2, [(0, 1), (1, 3)]), (3, 3, [(0, 1), (1, 2), (2, 3)]), (5, 3, [(0, 1), (1, 3), (3, 5)])],
)
@pytest.mark.parametrize("chunk_size", [None, 4], ids=["materialised", "tiled"])
def test_batch_split_runs(batch: int, threads: int, runs: list, chunk_size: int | None) -> None:
    cfg, x, dz, params = grid.make_case("embedded_gaussian", 2, "pool_after", batch=batch)
    z, cache = nlref.forward(x, params, cfg, threads=threads, chunk_size=chunk_size)
    assert cache.threads == threads
    assert [run_.batch for run_ in cache.runs] == runs
    n_tiles = 1 if chunk_size is None else -(-N // chunk_size)
    for run_ in cache.runs:
        b = run_.batch[1] - run_.batch[0]
        tiled = run_.attention
        assert tiled.threads == 1  # each run's attention on its own thread
        assert tuple(tiled.theta.shape) == (b, C_INTER, N)
        assert tuple(tiled.values.shape) == (b, C_INTER, grid.N_KEYS)
        assert len(tiled.tiles) == n_tiles
        assert all(tile.batch == (0, b) for tile in tiled.tiles)  # local to the run
        assert tiled.stored == (chunk_size is None)
    assert tuple(cache.values.shape) == (batch, C_INTER, grid.N_KEYS)
    dx, _ = nlref.backward(dz, cache)
    assert tuple(dx.shape) == tuple(z.shape) == tuple(x.shape)


@pytest.mark.parametrize(
    ("batch", "threads", "chunk_size", "tiles"),
    [
        (1, 3, None, [((0, 1), (0, 10)), ((0, 1), (10, 20)), ((0, 1), (20, 30))]),
        (
            2,
            3,
            None,
            [((0, 1), (0, 15)), ((0, 1), (15, 30)), ((1, 2), (0, 15)), ((1, 2), (15, 30))],
        ),
        (2, 3, 13, [((0, 2), (0, 13)), ((0, 2), (13, 26)), ((0, 2), (26, 30))]),
        (1, 1, 13, [((0, 1), (0, 13)), ((0, 1), (13, 26)), ((0, 1), (26, 30))]),
    ],
)
def test_tile_split_tiles(batch: int, threads: int, chunk_size: Any, tiles: list) -> None:
    cfg, x, _, params = grid.make_case("dot_product", 2, "pool_after", batch=batch)
    _, cache = nlref.forward(x, params, cfg, threads=threads, chunk_size=chunk_size)
    assert cache.threads == threads
    assert len(cache.runs) == 1 and cache.runs[0].batch == (0, batch)
    tiled = cache.runs[0].attention
    assert tiled.threads == threads
    assert [(tile.batch, tile.queries) for tile in tiled.tiles] == tiles
    assert all((tile.attention is not None) == (chunk_size is None) for tile in tiled.tiles)


@pytest.mark.parametrize("pairwise", VARIANTS)
def test_recomputed_tiles_keep_only_row_statistics(pairwise: str) -> None:
    """A tiled forward keeps nothing of size N × N′: a softmax variant's tiles keep their
    row statistics (O(rows)), other variants' tiles nothing."""
    cfg, x, _, params = grid.make_case(pairwise, 2, "full")
    _, cache = nlref.forward(x, params, cfg, chunk_size=7)
    softmax = nlref.pairwise.get(pairwise).softmax
    for tile in cache.runs[0].attention.tiles:
        assert tile.attention is None
        if softmax:
            rows = tile.queries[1] - tile.queries[0]
            assert isinstance(tile.state, RowStats)
            assert tuple(tile.state.max.shape) == (x.shape[0], rows, 1)
        else:
            assert tile.state is None


# --- 6. the reference takes no engine options ----------------------------------------------

ENGINE_OPTIONS = {
    *["chunk_size", "memory_limit", "threads"],  # nlref.forward's, for the engine
    *["overwrite_input", "inplace", "out", "rows"],  # work in place, part of the attention
}


def reference_functions() -> dict[str, Any]:
    """The block's forward, backward and steps, every layer's functions, and every
    variant's."""
    modules = {"block": nlref.block}
    for module_info in pkgutil.iter_modules(nlref.layers.__path__):
        name = module_info.name
        modules[f"layers.{name}"] = importlib.import_module(f"nlref.layers.{name}")
    found = {}
    for prefix, module in modules.items():
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            if fn.__module__ == module.__name__ and not name.startswith("_"):
                found[f"{prefix}.{name}"] = fn
    for variant in nlref.pairwise.all_variants():
        found[f"{variant.name}.forward"] = variant.forward
        found[f"{variant.name}.backward"] = variant.backward
        if variant.logits is not None:
            found[f"{variant.name}.logits.forward"] = variant.logits.forward
            found[f"{variant.name}.logits.backward"] = variant.logits.backward
    return found


def test_reference_functions_take_no_engine_options() -> None:
    functions = reference_functions()
    expected = {"block.forward", "block.backward", "block.embed", "block.unproject"}
    expected |= {"layers.softmax.forward", "embedded_gaussian.logits.forward"}
    assert expected <= set(functions)
    for name, fn in functions.items():
        options = ENGINE_OPTIONS & set(inspect.signature(fn).parameters)
        assert not options, f"{name} takes engine options {sorted(options)}"


@pytest.mark.parametrize("pairwise", VARIANTS)
def test_reference_variants_and_softmax_leave_their_inputs_alone(pairwise: str) -> None:
    """The plain formulas never write into what they are given (NumPy inputs made
    read-only: a write would raise)."""
    variant = nlref.pairwise.get(pairwise)
    rng = np.random.default_rng(0)
    theta, phi = rng.standard_normal((2, 3, 7)), rng.standard_normal((2, 3, 5))
    extra = {k: rng.standard_normal(s) for k, s in variant.extra_params(3).items()}
    for a in [theta, phi, *extra.values()]:
        a.flags.writeable = False
    attention, cache = variant.forward(theta, phi, extra, 0.7)
    dattention = rng.standard_normal(attention.shape)
    dattention.flags.writeable = False
    variant.backward(dattention, cache)
    s = rng.standard_normal((2, 5, 7))
    s.flags.writeable = False
    p, softmax_cache = nlref.layers.softmax.forward(s)
    dp = rng.standard_normal(p.shape)
    dp.flags.writeable = False
    nlref.layers.softmax.backward(dp, softmax_cache)
