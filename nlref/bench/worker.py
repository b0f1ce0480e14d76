"""The benchmark's worker processes: one side of one measurement in a fresh process.

Each measurement runs in its own subprocess, so that its peak memory is its own: an nlref
worker imports only nlref and NumPy (CuPy with ``backend="cupy"``), a torch worker imports
PyTorch. The parent drives a worker over stdin / stdout with JSON lines (:class:`Worker`):

1. the worker reads its spec from argv, builds the inputs, runs ``warmup`` untimed
   forward + backward passes and answers ``{"ready": true, ...}``;
2. each ``run`` is one timed forward + backward: ``{"time": seconds}``;
3. ``finish`` answers the memory it used (and, when the spec has an ``out`` path, runs
   once more and saves the outputs and gradients there as ``.npz``); the worker exits.

A worker that fails answers ``{"error": "..."}`` and exits; :class:`Worker` raises
:class:`WorkerError` with that message.

Memory: ``peak_rss`` is the peak resident set of the whole process (imports and inputs
included); on the GPU, ``peak_device`` is what the library's memory pool held. With
``work_memory`` in the spec, ``finish`` also measures one more run's own working memory
(:func:`_work_memory`): ``work_peak`` (host) and ``work_device`` (GPU pool).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .cases import BenchCase, inputs

__all__ = ["Worker", "WorkerError", "main", "sgemm"]


class WorkerError(RuntimeError):
    """A benchmark worker failed (its message, or the end of its stderr)."""


# ------------------------------------------------------------------------ memory


def _peak_rss() -> int:
    """Peak resident set size of this process since it started, in bytes."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _status(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status in bytes, None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _current_rss() -> int:
    rss = _status("VmRSS")
    return _peak_rss() if rss is None else rss


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux ≥ 4.0); False if not."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status("VmHWM") is not None


def _work_memory(side: Any) -> tuple[int | None, int | None]:
    """One more run, measuring the memory it needs above a settled process.

    malloc is first told to map every block of 1 MiB or more on its own and to unmap it
    when freed (glibc otherwise raises that threshold as blocks are freed, and keeps
    blocks below it, so that the resident set would say more about malloc's history than
    about the run); freed memory is handed back, the peak marks reset, and one forward +
    backward runs. Returns (bytes above the resident set before the run, or None where
    the kernel keeps no resettable peak; bytes above the library pool's use, on the GPU).
    """
    _malloc_setup(mmap_threshold=2**20)
    _release_freed_memory()
    base = _current_rss()
    tracks = _reset_peak_rss()
    side.reset_device_peak()
    out = side.run()
    del out
    hwm = _status("VmHWM") if tracks else None
    device = side.device_peak()
    return (None if hwm is None else max(hwm - base, 0), None if device is None else device[1])


def _libc() -> Any:
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None


def _malloc_setup(mmap_threshold: int) -> None:
    """glibc's ``mallopt(M_MMAP_THRESHOLD, ...)``; nothing elsewhere."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD


def _release_freed_memory() -> None:
    """Collect garbage and hand memory that malloc keeps after ``free`` back to the OS
    (glibc's ``malloc_trim``), so that the resident set is what is still in use."""
    import gc

    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _limit_threads(threads: int) -> dict[str, Any]:
    """Limit BLAS / OpenMP pools with threadpoolctl where it is installed; report them."""
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        return {"threadpoolctl": None}
    threadpool_limits(limits=threads)
    pools = [
        {"api": p.get("user_api"), "library": p.get("internal_api"), "threads": p["num_threads"]}
        for p in threadpool_info()
    ]
    return {"threadpoolctl": pools}


# ------------------------------------------------------------------------- sides


class _NlrefSide:
    """nlref's forward and backward on NumPy or CuPy."""

    def __init__(
        self, case: BenchCase, backend: str, seed: int, chunk_size: int | None = None
    ) -> None:
        import array_api_compat

        from ..api import backward, forward
        from ..engine import plan

        self.cfg, x, dz, params = inputs(case, seed)
        if backend == "cupy":
            import cupy

            xp = array_api_compat.array_namespace(cupy.empty(0))
            self._sync = cupy.cuda.Device().synchronize
            self._pool = cupy.get_default_memory_pool()
        else:
            xp = array_api_compat.array_namespace(np.empty(0))
            self._sync = lambda: None
            self._pool = None
        self.x, self.dz = xp.asarray(x), xp.asarray(dz)
        self.params = {k: xp.asarray(v) for k, v in params.items()}
        self.chunk_size = chunk_size
        self.plan = plan(self.x, self.cfg, chunk_size=chunk_size)  # what forward will do
        self._forward, self._backward = forward, backward
        self._device_base = 0

    def run(self) -> dict[str, Any]:
        z, cache = self._forward(self.x, self.params, self.cfg, chunk_size=self.chunk_size)
        dx, grads = self._backward(self.dz, cache)
        self._sync()
        return {"z": z, "dx": dx, **grads}

    def host(self, a: Any) -> np.ndarray:
        from .._backend import to_numpy

        return np.asarray(to_numpy(a), dtype=np.float32)

    def reset_device_peak(self) -> None:
        if self._pool is not None:
            self._pool.free_all_blocks()
            self._device_base = int(self._pool.used_bytes())

    def device_peak(self) -> tuple[int, int] | None:
        """(bytes the pool holds, of which above the inputs): the pool keeps its peak."""
        if self._pool is None:
            return None
        total = int(self._pool.total_bytes())
        return total, total - self._device_base

    def info(self) -> dict[str, Any]:
        plan = self.plan
        b = self.x.shape[0]
        if plan.threads == 1:
            split = "1 thread"
        else:
            split = f"{plan.threads} threads, {'batch' if b >= plan.threads else 'tiles'} split"
        return {
            "plan": f"{plan.reason}; {split}",
            "chunk_size": plan.chunk_size,
            "n_tiles": plan.n_tiles,
            "threads": plan.threads,
        }


class _TorchSide:
    """The same block in PyTorch eager (:mod:`nlref.bench.twin`), autograd for the backward."""

    def __init__(self, case: BenchCase, backend: str, seed: int, threads: int) -> None:
        import torch

        from . import twin

        torch.set_num_threads(threads)
        self.torch, self.twin = torch, twin
        self.cfg, x, dz, params = inputs(case, seed)
        self.materialise = case.materialise
        twin.formula(self.cfg.pairwise)  # refuse a variant the twin does not know, now
        device = "cuda" if backend == "cupy" else "cpu"
        if device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False  # float32 products, as CuPy does
            torch.backends.cudnn.allow_tf32 = False
            self._sync = torch.cuda.synchronize
        else:
            self._sync = lambda: None
        self.device = device
        self.x = torch.from_numpy(x).to(device).requires_grad_(True)
        self.dz = torch.from_numpy(dz).to(device)
        self.tensors = {
            k: torch.from_numpy(v).to(device).requires_grad_(k not in twin.BUFFER_NAMES)
            for k, v in params.items()
        }
        self.trainable = [k for k in self.tensors if k not in twin.BUFFER_NAMES]
        self._device_base = 0

    def run(self) -> dict[str, Any]:
        out = self.twin.block(self.x, self.tensors, self.cfg, materialise=self.materialise)
        wrt = [self.x, *(self.tensors[n] for n in self.trainable)]
        grads = self.torch.autograd.grad(out.z, wrt, self.dz)
        self._sync()
        return {
            "z": out.z.detach(),
            "dx": grads[0],
            **dict(zip(self.trainable, grads[1:], strict=True)),
        }

    def host(self, a: Any) -> np.ndarray:
        return a.detach().cpu().numpy().astype(np.float32)

    def reset_device_peak(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.reset_peak_memory_stats()
            self._device_base = int(self.torch.cuda.memory_allocated())

    def device_peak(self) -> tuple[int, int] | None:
        if self.device != "cuda":
            return None
        cuda = self.torch.cuda
        return int(cuda.max_memory_reserved()), int(cuda.max_memory_allocated()) - self._device_base

    def info(self) -> dict[str, Any]:
        return {"torch": self.torch.__version__, "torch_threads": self.torch.get_num_threads()}


def _sgemm_rate(library: str, backend: str, threads: int, size: int | None = None) -> float:
    """Median GFLOP/s of a square float32 product (2048 on the CPU, 8192 on the GPU)."""
    n = size or (8192 if backend == "cupy" else 2048)
    rng = np.random.default_rng(0)
    a_host = rng.standard_normal((n, n)).astype(np.float32)
    b_host = rng.standard_normal((n, n)).astype(np.float32)
    if library == "torch":
        import torch

        torch.set_num_threads(threads)
        device = "cuda" if backend == "cupy" else "cpu"
        if device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
        a, b = torch.from_numpy(a_host).to(device), torch.from_numpy(b_host).to(device)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        matmul = torch.matmul
    elif backend == "cupy":
        import cupy

        a, b = cupy.asarray(a_host), cupy.asarray(b_host)
        sync, matmul = cupy.cuda.Device().synchronize, cupy.matmul
    else:
        a, b, sync, matmul = a_host, b_host, (lambda: None), np.matmul
    times = []
    for i in range(8):
        start = time.perf_counter()
        matmul(a, b)
        sync()
        if i >= 3:  # 3 warm-up products
            times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


# ---------------------------------------------------------------- the worker's side


def _reply(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of a worker process; speaks JSON lines (see the module docstring).

    The spec (JSON, argv[0]) has ``side`` (``"nlref"``, ``"torch"`` or
    ``"sgemm:<library>"``), ``backend``, ``threads``, and for a block: ``case``
    (:meth:`BenchCase.to_json`), ``seed``, ``warmup``, ``out`` (a path or None) and, for
    nlref, ``chunk_size``.
    """
    spec = json.loads((sys.argv[1:] if argv is None else list(argv))[0])
    try:
        _serve(spec)
    except Exception as err:  # told to the parent, which reports it
        _reply({"error": f"{type(err).__name__}: {err}"})
        sys.exit(1)


def _serve(spec: dict[str, Any]) -> None:
    threads = spec["threads"]
    info = _limit_threads(threads)
    if spec["side"].startswith("sgemm:"):
        library = spec["side"].split(":", 1)[1]
        rate = _sgemm_rate(library, spec["backend"], threads, spec.get("size"))
        _reply({"gflops": rate, **info})
        return
    case = BenchCase.from_json(spec["case"])
    if spec["side"] == "nlref":
        side: Any = _NlrefSide(case, spec["backend"], spec["seed"], spec.get("chunk_size"))
    else:
        side = _TorchSide(case, spec["backend"], spec["seed"], threads)
    setup_rss = _current_rss()
    for _ in range(spec["warmup"]):
        out = side.run()
        del out
    _reply({"ready": True, "setup_rss": setup_rss})
    for line in sys.stdin:
        command = line.strip()
        if command == "run":
            start = time.perf_counter()
            out = side.run()
            elapsed = time.perf_counter() - start
            del out
            _reply({"time": elapsed})
        elif command == "finish":
            if spec.get("out"):
                out = side.run()
                np.savez(spec["out"], **{k: side.host(v) for k, v in out.items()})
                del out
            peak_rss, device = _peak_rss(), side.device_peak()
            work_peak = work_device = None
            if spec.get("work_memory"):
                work_peak, work_device = _work_memory(side)
            _reply(
                {
                    "peak_rss": peak_rss,
                    "setup_rss": setup_rss,
                    "work_peak": work_peak,
                    "peak_device": None if device is None else device[0],
                    "work_device": work_device,
                    **info,
                    **side.info(),
                }
            )
            return


# --------------------------------------------------------------- the parent's side


class Worker:
    """A worker process, driven over stdin / stdout.

    Parameters
    ----------
    spec : dict
        See :func:`main`. ``threads`` also sets ``OMP_NUM_THREADS``,
        ``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS`` and ``NLREF_NUM_THREADS`` there.
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(spec["threads"])
        env["NLREF_NUM_THREADS"] = str(spec["threads"])
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, env.get("PYTHONPATH", "")) if p
        )
        code = "from nlref.bench.worker import main; main()"
        self.side = spec["side"]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    def read(self) -> dict[str, Any]:
        """The worker's next reply; raises :class:`WorkerError` when it failed."""
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read()
            self.proc.wait()
            tail = err.strip()[-3000:] or f"exit status {self.proc.returncode}"
            raise WorkerError(f"benchmark worker {self.side!r} failed:\n{tail}")
        reply = json.loads(line)
        if "error" in reply:
            raise WorkerError(f"benchmark worker {self.side!r} failed: {reply['error']}")
        return reply

    def ask(self, command: str) -> dict[str, Any]:
        """Send ``command`` (``run`` or ``finish``) and return the reply."""
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        """End the process (it has ended by itself after ``finish``)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            stream.close()


def sgemm(library: str, backend: str, threads: int, size: int | None = None) -> float:
    """GFLOP/s of a square float32 product in ``library`` (``"numpy"`` stands for CuPy
    with ``backend="cupy"``, or ``"torch"``), measured in a worker process."""
    spec = {"side": f"sgemm:{library}", "backend": backend, "threads": threads, "size": size}
    worker = Worker(spec)
    try:
        return float(worker.read()["gflops"])
    finally:
        worker.close()
