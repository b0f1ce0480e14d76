"""Ctrl-C, or an error in one worker, during a threaded call: no worker outlives the call.

The workers are watched through a registered pairwise function that wraps the dot product:
it counts the tiles being evaluated, and each tile sleeps a little, so that the call lasts
long enough to be interrupted in the middle. After the call has returned (with the
interruption or the error), nothing may still be computing, nothing may start later, and
the BLAS library must have its thread count from before the call.

The interruption is a real SIGINT sent to the main thread (``signal.pthread_kill``) from
the first worker, while the main thread waits for the workers.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import threadpoolctl

import nlref
from nlref import pairwise

NAME = "counted_dot_product"
TILE_SECONDS = 0.01
pytestmark = pytest.mark.skipif(
    not hasattr(signal, "pthread_kill"), reason="needs signal.pthread_kill (POSIX)"
)


class Watch:
    """Counts of the tiles the workers started and are evaluating, and what to do at the
    first one."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = 0
        self.active = 0
        self.at_first: Any = None

    def snapshot(self) -> tuple[int, int]:
        with self.lock:
            return self.started, self.active


WATCH = Watch()


@pytest.fixture
def counted() -> Iterator[Watch]:
    """A pairwise function that is the dot product, counted and slowed down per tile."""
    base = pairwise.get("dot_product")

    def forward(theta: Any, phi: Any, extra: Any, scale: float) -> Any:
        with WATCH.lock:
            WATCH.started += 1
            WATCH.active += 1
            first = WATCH.started == 1
        try:
            if first and WATCH.at_first is not None:
                WATCH.at_first()
            time.sleep(TILE_SECONDS)
            return base.forward(theta, phi, extra, scale)
        finally:
            with WATCH.lock:
                WATCH.active -= 1

    pairwise.register(dataclasses.replace(base, name=NAME, forward=forward))
    WATCH.started = WATCH.active = 0
    WATCH.at_first = None
    try:
        yield WATCH
    finally:
        pairwise.unregister(NAME)


def case() -> tuple[nlref.NonLocalConfig, dict[str, Any], np.ndarray]:
    """B = 1, N = 48 queries in tiles of 1 on 2 threads: 2 runs of 24 tiles each."""
    cfg = nlref.NonLocalConfig(in_channels=4, pairwise=NAME)
    params = nlref.init_params(cfg, rng=0, scheme="random")
    x = np.random.default_rng(0).standard_normal((1, 4, 6, 8))
    return cfg, params, x


def blas_threads() -> list[int]:
    return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]


def assert_nothing_left(watch: Watch, started_at_return: int, active_at_return: int) -> None:
    """At the return nothing was computing; and nothing starts afterwards."""
    assert active_at_return == 0, f"{active_at_return} tiles still computing after the call"
    assert started_at_return < 48 // 2, f"{started_at_return} tiles started: not stopped"
    time.sleep(10 * TILE_SECONDS)
    assert watch.snapshot() == (started_at_return, 0), "a tile started after the call"


def test_keyboard_interrupt_stops_the_workers(counted: Watch) -> None:
    cfg, params, x = case()
    blas_before = blas_threads()
    main = threading.main_thread().ident
    assert main == threading.get_ident()
    counted.at_first = lambda: signal.pthread_kill(main, signal.SIGINT)  # Ctrl-C
    caught = False
    try:
        nlref.forward(x, params, cfg, chunk_size=1, threads=2)
    except KeyboardInterrupt:
        caught = True
        started, active = counted.snapshot()
    assert caught, "the SIGINT did not interrupt the call"
    assert_nothing_left(counted, started, active)
    assert blas_threads() == blas_before
    # and the next call works, with the same result as one thread
    counted.at_first = None
    z, _ = nlref.forward(x, params, cfg, chunk_size=1, threads=2)
    want, _ = nlref.forward(x, params, cfg, chunk_size=1, threads=1)
    np.testing.assert_allclose(z, want, rtol=1e-13, atol=1e-13)


def test_error_in_a_worker_stops_the_others(counted: Watch) -> None:
    cfg, params, x = case()
    blas_before = blas_threads()

    def fail() -> None:
        time.sleep(3 * TILE_SECONDS)  # the other worker is well into its run meanwhile
        raise RuntimeError("a tile failed")

    counted.at_first = fail
    with pytest.raises(RuntimeError, match="a tile failed"):
        nlref.forward(x, params, cfg, chunk_size=1, threads=2)
    started, active = counted.snapshot()
    assert_nothing_left(counted, started, active)
    assert blas_threads() == blas_before


def test_backward_interrupted_stops_the_workers(counted: Watch) -> None:
    """The backward recomputes each tile (chunk_size given): interrupted the same way."""
    cfg, params, x = case()
    z, cache = nlref.forward(x, params, cfg, chunk_size=1, threads=2)
    counted.started = 0
    main = threading.main_thread().ident
    counted.at_first = lambda: signal.pthread_kill(main, signal.SIGINT)
    caught = False
    try:
        nlref.backward(np.ones_like(z), cache)
    except KeyboardInterrupt:
        caught = True
        started, active = counted.snapshot()
    assert caught
    assert_nothing_left(counted, started, active)
