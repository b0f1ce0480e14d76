"""A process forked before, after or during a threaded call can run threaded calls itself.

This is how PyTorch ``DataLoader`` workers and multiprocessing pools start on Linux. A
forked child has only the thread that forked: nlref's worker threads, and a thread that
may hold the region lock and the BLAS limit, are gone. nlref resets them in the child
(:func:`os.register_at_fork`). Each child here runs a threaded forward and backward, checks
them against the parent's one-thread result, and checks that its BLAS library starts (and
ends) with the parent's thread count, not with the limit of a region it inherited.

Children are forked with ``os.fork`` and with multiprocessing's ``fork`` start method. A
child that hangs (what happened before the reset) is killed after a deadline and reported,
and the whole script runs in a subprocess with a timeout, so that a regression fails
instead of hanging the test suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork") or not hasattr(os, "register_at_fork"), reason="needs os.fork"
)

SCRIPT = textwrap.dedent(
    r"""
    import multiprocessing
    import os
    import sys
    import threading
    import time

    import numpy as np
    import threadpoolctl

    import nlref

    CHILD_SECONDS = 15
    cfg = nlref.NonLocalConfig(in_channels=8, pairwise="embedded_gaussian")
    params = nlref.init_params(cfg, rng=0, scheme="random")
    x = np.random.default_rng(0).standard_normal((1, 8, 12, 12))
    dz = np.random.default_rng(1).standard_normal(x.shape)


    def blas():
        info = threadpoolctl.threadpool_info()
        return [i["num_threads"] for i in info if i["user_api"] == "blas"]


    def threaded():
        z, cache = nlref.forward(x, params, cfg, chunk_size=16, threads=2)
        dx, _ = nlref.backward(dz, cache)
        return z, dx


    BLAS = blas()
    want_z, want_cache = nlref.forward(x, params, cfg, chunk_size=16, threads=1)
    want_dx, _ = nlref.backward(dz, want_cache)


    def child():
        # 0: ok, 3: BLAS limit inherited, 4: wrong result, 5: BLAS changed after the call
        if blas() != BLAS:
            return 3
        z, dx = threaded()
        if not (np.allclose(z, want_z, 1e-12, 1e-12) and np.allclose(dx, want_dx, 1e-12, 1e-12)):
            return 4
        return 0 if blas() == BLAS else 5


    def child_exit():
        os._exit(child())


    def fork_os():
        pid = os.fork()
        if pid == 0:
            code = 6  # an exception in the child
            try:
                code = child()
            finally:
                os._exit(code)
        deadline = time.monotonic() + CHILD_SECONDS
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.01)
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        return "hung"


    def fork_mp():
        process = multiprocessing.get_context("fork").Process(target=child_exit)
        process.start()
        process.join(CHILD_SECONDS)
        if process.is_alive():
            process.kill()
            process.join()
            return "hung"
        return process.exitcode


    outcomes = {}
    # before: nothing threaded has run in this process yet
    outcomes["before os.fork"] = fork_os()
    outcomes["before multiprocessing"] = fork_mp()
    # after: a threaded call has run, its workers idle
    threaded()
    outcomes["after os.fork"] = fork_os()
    outcomes["after multiprocessing"] = fork_mp()

    # during: another thread is inside threaded calls, holding the region and the limit
    stop = threading.Event()
    inside = []


    def busy():
        while not stop.is_set():
            threaded()
            inside.append(1)


    thread = threading.Thread(target=busy)
    thread.start()
    while not inside:
        time.sleep(0.001)
    for k in range(3):
        time.sleep(0.003 * k)
        outcomes[f"during os.fork {k}"] = fork_os()
        outcomes[f"during multiprocessing {k}"] = fork_mp()
    stop.set()
    thread.join()
    outcomes["parent after"] = 0 if blas() == BLAS and threaded() is not None else 7
    for name, code in outcomes.items():
        print(f"{name}: {code}")
    sys.exit(0 if all(code == 0 for code in outcomes.values()) else 1)
    """
)


def test_forked_children_run_threaded_calls() -> None:
    env = {**os.environ, "NLREF_BIND_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("NLREF_NUM_THREADS", None)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    report = done.stdout + done.stderr
    assert done.returncode == 0, f"a forked child hung or failed:\n{report}"
    assert report.count(": 0") == 11, report
