"""``nlref bench``: time and memory of nlref against PyTorch eager doing the same math.

Each side runs in its own fresh subprocess, so that its peak memory is its own: the nlref
process imports only nlref and NumPy (CuPy with ``--backend cupy``), the reference process
imports PyTorch. Both use float32, the same inputs and weights, the same thread count
(``torch.set_num_threads`` and, for BLAS, threadpoolctl and the ``*_NUM_THREADS``
variables), run forward plus backward, warm up, and then alternate, one run each at a
time, for ``--repeats`` runs; the table gives the medians::

    nlref bench                          # the three targets of docs/performance.md
    nlref bench --case eg-1k --repeats 9 --json bench.json
    nlref bench --backend cupy           # CuPy against PyTorch on the GPU
    nlref bench --list

Columns: median time; nlref time / reference time; peak resident memory of the process
(peak GPU memory held by the library's pool too, on the GPU); the fraction of the machine's
sgemm rate achieved (GEMM FLOPs of the case / time / the best sgemm rate measured here,
same threads); time / GEMM floor (the floor being GEMM FLOPs / sgemm rate); and the largest
difference of any output or gradient from the reference, relative to that tensor's largest
magnitude. Benchmarks are not tests: the exit status is 0 unless ``--check`` is given and a
target is missed (then 1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from . import CLIError

__all__ = ["CASES", "BenchCase", "add_parser", "run_bench", "worker_main"]

MiB = 2**20


@dataclass(frozen=True)
class BenchCase:
    """One benchmark: a block configuration, an input shape, a reference and the targets.

    Attributes
    ----------
    name : str
    pairwise : str
    shape : tuple of int
        (B, C, *S).
    reference : {"torch", "torch_materialising"}
        PyTorch eager written as AlexHex7 / mmcv do: 1×1 convolutions, ``matmul``,
        ``softmax``, batch norm; ``torch_materialising`` builds the concatenation's
        B×2C′×N×N′ tensor and projects it with a 1×1 convolution, as they do.
    max_ratio : float or None
        Target: nlref time / reference time at most this.
    max_floor : float or None
        Target: nlref time / GEMM floor at most this.
    min_speedup, min_memory_ratio : float or None
        Targets: reference time / nlref time, and reference peak / nlref peak, at least this.
    max_rss_mb : float or None
        Target: peak resident memory of the whole nlref process at most this many MB (10⁶).
    same_numbers : float
        Largest difference from the reference allowed, relative to each tensor's largest
        magnitude (float32 rounding over sums of N′ terms).
    """

    name: str
    pairwise: str
    shape: tuple[int, ...]
    reference: str = "torch"
    norm: str | None = "batchnorm"
    sub_sample: tuple[int, ...] | None = None
    max_ratio: float | None = None
    max_floor: float | None = None
    min_speedup: float | None = None
    min_memory_ratio: float | None = None
    max_rss_mb: float | None = None
    same_numbers: float = 1e-3
    default: bool = True

    def config(self) -> Any:
        from ..config import NonLocalConfig

        return NonLocalConfig(
            in_channels=self.shape[1],
            pairwise=self.pairwise,
            norm=self.norm,
            sub_sample=self.sub_sample,
        )

    def describe(self) -> str:
        b, c, *spatial = self.shape
        n = math.prod(spatial)
        return (
            f"{self.pairwise}, B={b}, C={c}, C'={self.config().inter_channels}, "
            f"S={'x'.join(map(str, spatial))} (N={n}), {self.norm or 'no norm'}, fwd+bwd"
        )


CASES: dict[str, BenchCase] = {
    c.name: c
    for c in (
        BenchCase("eg-1k", "embedded_gaussian", (2, 256, 32, 32), max_ratio=0.9, max_floor=1.3),
        BenchCase(
            "concat-1k",
            "concatenation",
            (2, 256, 32, 32),
            reference="torch_materialising",
            min_speedup=50.0,
            min_memory_ratio=20.0,
        ),
        BenchCase("eg-16k", "embedded_gaussian", (1, 64, 128, 128), max_ratio=0.5, max_rss_mb=512),
        BenchCase("gaussian-1k", "gaussian", (2, 256, 32, 32), default=False),
        BenchCase("dot-1k", "dot_product", (2, 256, 32, 32), default=False),
        BenchCase("concat-1k-eager", "concatenation", (2, 256, 32, 32), default=False),
    )
}

REFERENCE_LABELS = {
    "torch": "torch eager",
    "torch_materialising": "torch materialising",
}


# ------------------------------------------------------------------------------- worker


def _peak_rss() -> int:
    """Peak resident set size of this process, in bytes."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _current_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _peak_rss()


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


def _inputs(
    case: BenchCase, seed: int
) -> tuple[Any, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    from ..params import init_params

    cfg = case.config()
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(case.shape).astype(np.float32)
    dz = rng.standard_normal(case.shape).astype(np.float32)
    params = init_params(cfg, rng=seed + 1, scheme="random", dtype="float32")
    return cfg, x, dz, params


class _NlrefSide:
    """nlref's forward and backward on NumPy or CuPy."""

    def __init__(self, case: BenchCase, backend: str, seed: int) -> None:
        import array_api_compat

        from ..block import backward, forward

        self.cfg, x, dz, params = _inputs(case, seed)
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
        self._forward, self._backward = forward, backward
        self.plan = None
        self.split = ""

    def run(self) -> dict[str, Any]:
        z, cache = self._forward(self.x, self.params, self.cfg, training=True)
        dx, grads = self._backward(self.dz, cache)
        self._sync()
        self.plan = getattr(cache, "plan", None)  # None: the reference path ran
        threads = getattr(cache, "threads", 1)
        if threads == 1:
            self.split = "1 thread"
        else:
            how = "batch split" if len(cache.runs) > 1 else "tiles split"
            self.split = f"{threads} threads, {how}"
        return {"z": z, "dx": dx, **grads}

    def host(self, a: Any) -> np.ndarray:
        from .._backend import to_numpy

        return np.asarray(to_numpy(a), dtype=np.float32)

    def device_peak(self) -> int | None:
        return None if self._pool is None else int(self._pool.total_bytes())

    def info(self) -> dict[str, Any]:
        plan = self.plan
        if plan is None:
            return {"plan": f"reference path; {self.split}", "chunk_size": None, "n_tiles": 1}
        return {
            "plan": f"{plan.reason}; {self.split}",
            "chunk_size": plan.chunk_size,
            "n_tiles": plan.n_tiles,
        }


class _TorchSide:
    """The same block in PyTorch eager, written the way AlexHex7 and mmcv write it."""

    def __init__(self, case: BenchCase, backend: str, seed: int, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.torch = torch
        self.cfg, x, dz, params = _inputs(case, seed)
        self.materialise = case.reference == "torch_materialising"
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
        self.buffers = {
            k: torch.from_numpy(v).to(device) for k, v in params.items() if "running" in k
        }
        self.params = {
            k: torch.from_numpy(v).to(device).requires_grad_(True)
            for k, v in params.items()
            if "running" not in k
        }

    def run(self) -> dict[str, Any]:
        torch = self.torch
        z = self._block()
        names = list(self.params)
        grads = torch.autograd.grad(z, [self.x, *(self.params[n] for n in names)], self.dz)
        self._sync()
        return {"z": z.detach(), "dx": grads[0], **dict(zip(names, grads[1:], strict=True))}

    def host(self, a: Any) -> np.ndarray:
        return a.detach().cpu().numpy().astype(np.float32)

    def device_peak(self) -> int | None:
        if self.device != "cuda":
            return None
        return int(self.torch.cuda.max_memory_reserved())

    def info(self) -> dict[str, Any]:
        return {"torch": self.torch.__version__, "torch_threads": self.torch.get_num_threads()}

    def _block(self) -> Any:
        import torch.nn.functional as F

        torch, cfg, p, x = self.torch, self.cfg, self.params, self.x
        b, c, *spatial = x.shape
        d = len(spatial)
        conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]

        def conv1x1(layer: str, u: Any) -> Any:
            w = p[f"{layer}.weight"]
            return conv(u, w.reshape(*w.shape, *([1] * d)), p.get(f"{layer}.bias"))

        def pool(u: Any) -> Any:
            if cfg.sub_sample is None:
                return u
            max_pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[d - 1]
            return max_pool(u, cfg.sub_sample, cfg.sub_sample)

        ci = cfg.inter_channels
        g_x = pool(conv1x1("g", x)).view(b, ci, -1).permute(0, 2, 1)  # (B, N', C')
        if cfg.pairwise == "gaussian":
            theta_x = x.view(b, c, -1).permute(0, 2, 1)
            phi_x = pool(x).view(b, c, -1)
        else:
            theta_x = conv1x1("theta", x).view(b, ci, -1).permute(0, 2, 1)  # (B, N, C')
            phi_x = pool(conv1x1("phi", x)).view(b, ci, -1)  # (B, C', N')
        if cfg.pairwise == "concatenation":
            n, n_keys = theta_x.shape[1], phi_x.shape[2]
            w_f = p["concat.weight"]
            if self.materialise:  # AlexHex7 / mmcv: [theta_i; phi_j] as (B, 2C', N, N')
                t = theta_x.permute(0, 2, 1).reshape(b, ci, n, 1).repeat(1, 1, 1, n_keys)
                q = phi_x.reshape(b, ci, 1, n_keys).repeat(1, 1, n, 1)
                pairs = torch.cat([t, q], dim=1)
                f = F.relu(F.conv2d(pairs, w_f.reshape(1, 2 * ci, 1, 1))).view(b, n, n_keys)
            else:  # the split w_theta^T theta_i + w_phi^T phi_j, in (B, N, N')
                a = torch.matmul(theta_x, w_f[:ci])  # (B, N)
                k = torch.matmul(w_f[ci:], phi_x)  # (B, N')
                f = F.relu(a[:, :, None] + k[:, None, :])
            attention = f / n_keys
        else:
            f = torch.matmul(theta_x, phi_x)  # (B, N, N')
            if cfg.scale is not None:
                f = f * cfg.scale
            if cfg.pairwise == "dot_product":
                attention = f / f.shape[-1]
            else:
                attention = F.softmax(f, dim=-1)
        y = torch.matmul(attention, g_x)  # (B, N, C')
        y = y.permute(0, 2, 1).contiguous().view(b, ci, *spatial)
        w_y = conv1x1("z", y)
        if cfg.norm == "batchnorm":
            w_y = F.batch_norm(
                w_y,
                self.buffers["bn.running_mean"].clone(),
                self.buffers["bn.running_var"].clone(),
                p["bn.weight"],
                p["bn.bias"],
                training=True,
                momentum=cfg.bn_momentum,
                eps=cfg.bn_eps,
            )
        return w_y + x


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


def _case_from_json(fields: dict[str, Any]) -> BenchCase:
    fields = dict(fields)
    fields["shape"] = tuple(fields["shape"])
    if fields["sub_sample"] is not None:
        fields["sub_sample"] = tuple(fields["sub_sample"])
    return BenchCase(**fields)


def worker_main(argv: Sequence[str] | None = None) -> None:
    """Entry point of a benchmark subprocess (see :func:`run_bench`); speaks JSON lines.

    Reads one spec (JSON) from argv; prints ``{"ready": ...}`` after the warm-up, then
    answers ``run`` with ``{"time": seconds}`` and ``finish`` with the peak memory (and
    writes the outputs to the spec's ``out`` path as ``.npz``).
    """
    spec = json.loads((sys.argv[1:] if argv is None else list(argv))[0])
    threads = spec["threads"]
    info = _limit_threads(threads)
    if spec["side"].startswith("sgemm:"):
        library = spec["side"].split(":", 1)[1]
        rate = _sgemm_rate(library, spec["backend"], threads, spec.get("size"))
        print(json.dumps({"gflops": rate, **info}), flush=True)
        return
    case = _case_from_json(spec["case"])
    if spec["side"] == "nlref":
        side: Any = _NlrefSide(case, spec["backend"], spec["seed"])
    else:
        side = _TorchSide(case, spec["backend"], spec["seed"], threads)
    setup_rss = _current_rss()
    for _ in range(spec["warmup"]):
        out = side.run()
        del out
    print(json.dumps({"ready": True, "setup_rss": setup_rss}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "run":
            start = time.perf_counter()
            out = side.run()
            elapsed = time.perf_counter() - start
            del out
            print(json.dumps({"time": elapsed}), flush=True)
        elif command == "finish":
            out = side.run()
            np.savez(spec["out"], **{k: side.host(v) for k, v in out.items()})
            del out
            reply = {
                "peak_rss": _peak_rss(),
                "setup_rss": setup_rss,
                "peak_device": side.device_peak(),
                **info,
                **side.info(),
            }
            print(json.dumps(reply), flush=True)
            return


# ------------------------------------------------------------------------------- parent


class _Worker:
    """A benchmark subprocess, driven over stdin / stdout."""

    def __init__(self, spec: dict[str, Any]) -> None:
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(spec["threads"])
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, env.get("PYTHONPATH", "")) if p
        )
        code = "from nlref.commands.bench import worker_main; worker_main()"
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
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read()
            self.proc.wait()
            raise CLIError(f"benchmark worker {self.side!r} failed:\n{err.strip()[-3000:]}")
        return json.loads(line)

    def ask(self, command: str) -> dict[str, Any]:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@dataclass
class SideResult:
    """Timings and memory of one side of a case."""

    label: str
    times: list[float] = field(default_factory=list)
    peak_rss: int = 0
    setup_rss: int = 0
    peak_device: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def _sgemm(library: str, backend: str, threads: int, size: int | None) -> float:
    spec = {"side": f"sgemm:{library}", "backend": backend, "threads": threads, "size": size}
    worker = _Worker(spec)
    try:
        return float(worker.read()["gflops"])
    finally:
        worker.close()


def _compare(ours: Path, theirs: Path) -> dict[str, float]:
    """Largest |ours − theirs| per tensor, relative to the tensor's largest magnitude.

    Gradients that are zero by construction (φ's bias under the softmax, biases before
    training-mode batch norm) are float32 rounding noise on both sides: a tensor whose
    largest magnitude is below 1e-3 of the largest parameter gradient is compared relative
    to that largest gradient instead, so that noise is not read as a 100 % difference.
    """
    with np.load(ours, allow_pickle=False) as a, np.load(theirs, allow_pickle=False) as b:
        refs = {name: b[name].astype(np.float64) for name in b.files}
        params_max = max(
            (float(np.max(np.abs(v))) for k, v in refs.items() if k not in ("z", "dx")),
            default=0.0,
        )
        out = {}
        for name, ref in refs.items():
            scale = float(np.max(np.abs(ref)))
            if name not in ("z", "dx") and scale < 1e-3 * params_max:
                scale = params_max  # zero by construction: normwise over the parameters
            diff = float(np.max(np.abs(a[name].astype(np.float64) - ref)))
            out[name] = diff / (scale or 1.0)
        return out


def run_case(
    case: BenchCase,
    *,
    backend: str,
    threads: int,
    repeats: int,
    warmup: int,
    seed: int,
    workdir: Path,
    pause: float = 0.5,
    log: TextIO | None = None,
) -> dict[str, Any]:
    """Benchmark one case: both sides in their own processes, alternating runs.

    ``pause`` seconds pass between two runs, so that the worker threads of one side
    (OpenMP and OpenBLAS keep spinning for a while after a parallel region) are idle
    before the other side starts.
    """
    results = {
        "nlref": SideResult(f"nlref ({backend})"),
        "reference": SideResult(REFERENCE_LABELS[case.reference]),
    }
    sides = {"nlref": "nlref", "reference": case.reference}
    workers: dict[str, _Worker] = {}
    try:
        for key, side in sides.items():  # one after the other: warm-ups never overlap
            if log:
                print(f"  {case.name}: starting {results[key].label}", file=log, flush=True)
            spec = {
                "side": side,
                "case": asdict(case),
                "backend": backend,
                "threads": threads,
                "warmup": warmup,
                "seed": seed,
                "out": str(workdir / f"{case.name}-{key}.npz"),
            }
            workers[key] = _Worker(spec)
            workers[key].read()  # ready
        order = list(sides)
        for i in range(repeats):
            for key in order if i % 2 == 0 else order[::-1]:  # alternate who goes first
                time.sleep(pause)
                results[key].times.append(float(workers[key].ask("run")["time"]))
        for key, worker in workers.items():
            reply = worker.ask("finish")
            result = results[key]
            result.peak_rss, result.setup_rss = reply["peak_rss"], reply["setup_rss"]
            result.peak_device = reply.get("peak_device")
            result.info = {k: v for k, v in reply.items() if k not in asdict(result)}
    finally:
        for worker in workers.values():
            worker.close()
    diffs = _compare(workdir / f"{case.name}-nlref.npz", workdir / f"{case.name}-reference.npz")
    return {"results": results, "max_rel_diff": diffs}


def _targets(case: BenchCase, row: dict[str, Any], backend: str) -> list[dict[str, Any]]:
    ours, ref = row["nlref"], row["reference"]
    found = []

    def add(name: str, value: float, limit: float, at_most: bool) -> None:
        met = value <= limit if at_most else value >= limit
        found.append({"target": name, "value": value, "limit": limit, "met": bool(met)})

    if case.max_ratio is not None:
        add(f"nlref / {ref['label']} time <= {case.max_ratio}", row["ratio"], case.max_ratio, True)
    if case.max_floor is not None and row["nlref"]["x_floor"] is not None:
        add(f"nlref time / GEMM floor <= {case.max_floor}", ours["x_floor"], case.max_floor, True)
    if case.min_speedup is not None:
        add(f"speed-up over {ref['label']} >= {case.min_speedup:g}x", 1 / row["ratio"],
            case.min_speedup, False)  # fmt: skip
    if case.min_memory_ratio is not None:
        mem = ref["peak_bytes"] / ours["peak_bytes"]
        add(f"peak memory {ref['label']} / nlref >= {case.min_memory_ratio:g}x", mem,
            case.min_memory_ratio, False)  # fmt: skip
    if case.max_rss_mb is not None and backend == "numpy":  # a host-memory target
        add(f"nlref peak RSS <= {case.max_rss_mb:g} MB", ours["peak_rss"] / 1e6,
            case.max_rss_mb, True)  # fmt: skip
    add(f"same numbers (max rel diff <= {case.same_numbers:g})", row["max_rel_diff"],
        case.same_numbers, True)  # fmt: skip
    return found


def run_bench(
    cases: Sequence[str | BenchCase],
    *,
    backend: str = "numpy",
    threads: int | None = None,
    repeats: int = 5,
    warmup: int = 2,
    seed: int = 0,
    sgemm_size: int | None = None,
    pause: float = 0.5,
    log: TextIO | None = None,
) -> dict[str, Any]:
    """Run the cases (names of :data:`CASES`, or :class:`BenchCase` objects).

    Returns everything as a JSON-ready dict (what ``--json`` writes); :func:`format_report`
    turns it into the table.
    """
    from .. import __version__
    from ..engine.cost import gemm_flops

    threads = threads or os.cpu_count() or 1
    reference_lib = "torch"
    if log:
        print("measuring the sgemm rate ...", file=log, flush=True)
    sgemm = {
        ("cupy" if backend == "cupy" else "numpy"): _sgemm("numpy", backend, threads, sgemm_size),
        reference_lib: _sgemm("torch", backend, threads, sgemm_size),
    }
    rate = max(sgemm.values())
    report: dict[str, Any] = {
        "nlref": __version__,
        "backend": backend,
        "dtype": "float32",
        "threads": threads,
        "repeats": repeats,
        "warmup": warmup,
        "pause_s": pause,
        "machine": _machine(backend),
        "sgemm_gflops": sgemm,
        "sgemm_rate_gflops": rate,
        "cases": [],
    }
    with tempfile.TemporaryDirectory(prefix="nlref-bench-") as tmp:
        for item in cases:
            case = CASES[item] if isinstance(item, str) else item
            name = case.name
            measured = run_case(
                case,
                backend=backend,
                threads=threads,
                repeats=repeats,
                warmup=warmup,
                seed=seed,
                workdir=Path(tmp),
                pause=pause,
                log=log,
            )
            cfg = case.config()
            plan = measured["results"]["nlref"].info.get("chunk_size")
            flops = gemm_flops(cfg, case.shape)
            executed = gemm_flops(cfg, case.shape, chunked=plan is not None)["total"]
            floor = flops["total"] / (rate * 1e9)
            row: dict[str, Any] = {
                "case": name,
                "description": case.describe(),
                "shape": list(case.shape),
                "gemm_flops": flops["total"],
                "gemm_flops_executed_by_nlref": executed,
                "gemm_floor_s": floor,
            }
            for key, res in measured["results"].items():
                peak = res.peak_device if res.peak_device is not None else res.peak_rss
                row[key] = {
                    "label": res.label,
                    "times_s": res.times,
                    "median_s": res.median,
                    "peak_rss": res.peak_rss,
                    "setup_rss": res.setup_rss,
                    "peak_device": res.peak_device,
                    "peak_bytes": peak,
                    "sgemm_fraction": flops["total"] / res.median / (rate * 1e9),
                    "x_floor": res.median / floor,
                    "info": res.info,
                }
            row["ratio"] = row["nlref"]["median_s"] / row["reference"]["median_s"]
            row["max_rel_diff_per_tensor"] = measured["max_rel_diff"]
            row["max_rel_diff"] = max(measured["max_rel_diff"].values())
            row["targets"] = _targets(case, row, backend)
            report["cases"].append(row)
    return report


def _machine(backend: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    machine = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}
    machine["numpy"] = np.__version__
    if backend == "cupy":
        try:
            import cupy

            props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
            name = props["name"]
            machine["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
            machine["cupy"] = cupy.__version__
        except Exception as err:  # report, do not fail, the header
            machine["gpu"] = f"unknown ({err})"
    return machine


def _fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / MiB:.0f} MiB" if n < 10 * 2**30 else f"{n / 2**30:.1f} GiB"


def format_report(report: dict[str, Any]) -> str:
    """The table printed by ``nlref bench``."""
    gpu = report["backend"] == "cupy"
    m = report["machine"]
    where = m.get("gpu") if gpu else f"{m['cpu']}, {report['threads']} threads"
    lines = [
        f"nlref {report['nlref']} bench: {report['backend']} float32 on {where}; "
        f"median of {report['repeats']} alternating runs after {report['warmup']} warm-up "
        f"({report['pause_s']:g} s apart), forward+backward, each side in its own process",
        "sgemm: "
        + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in report["sgemm_gflops"].items())
        + f" -> machine rate {report['sgemm_rate_gflops']:.1f} GFLOP/s",
        "",
    ]
    mem = "peak GPU" if gpu else "peak RSS"
    header = (
        f"{'case':<10} {'impl':<22} {'time':>10} {'ratio':>7} {mem:>10} "
        f"{'%sgemm':>7} {'x floor':>8} {'max rel diff':>13}"
    )
    lines += [header, "-" * len(header)]
    for row in report["cases"]:
        for key in ("nlref", "reference"):
            side = row[key]
            ratio = side["median_s"] / row["reference"]["median_s"]
            peak = side["peak_device"] if gpu else side["peak_rss"]
            diff = f"{row['max_rel_diff']:.1e}" if key == "nlref" else "(reference)"
            lines.append(
                f"{row['case'] if key == 'nlref' else '':<10} {side['label']:<22} "
                f"{_fmt_time(side['median_s']):>10} {ratio:>7.3f} {_fmt_bytes(peak):>10} "
                f"{side['sgemm_fraction'] * 100:>6.0f}% {side['x_floor']:>8.2f} {diff:>13}"
            )
    lines += ["", "cases:"]
    for row in report["cases"]:
        extra = row["nlref"]["info"].get("plan", "")
        lines.append(
            f"  {row['case']}: {row['description']}; GEMM {row['gemm_flops'] / 1e9:.2f} GFLOP, "
            f"floor {_fmt_time(row['gemm_floor_s'])}; nlref: {extra}"
        )
    lines += ["", "targets:"]
    for row in report["cases"]:
        for t in row["targets"]:
            value = t["value"]
            shown = f"{value:.3g}" if abs(value) >= 1e-2 else f"{value:.1e}"
            lines.append(
                f"  {row['case']:<10} {t['target']:<58} {shown:>9}  "
                f"{'met' if t['met'] else 'NOT MET'}"
            )
    return "\n".join(lines)


def _cmd_bench(args: argparse.Namespace, out: TextIO) -> int:
    if args.list:
        for case in CASES.values():
            mark = "" if case.default else "  (not run by default)"
            print(f"{case.name:<16} {case.describe()}; vs {case.reference}{mark}", file=out)
        return 0
    names = args.case or [n for n, c in CASES.items() if c.default]
    if args.repeats < 5:
        raise CLIError(f"--repeats must be at least 5, got {args.repeats}")
    _check_available(args.backend)
    report = run_bench(
        names,
        backend=args.backend,
        threads=args.threads,
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
        pause=args.pause,
        log=sys.stderr,
    )
    print(format_report(report), file=out)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}", file=out)
    missed = [t for row in report["cases"] for t in row["targets"] if not t["met"]]
    return 1 if args.check and missed else 0


def _check_available(backend: str) -> None:
    import importlib.util

    from . import load_backend

    if importlib.util.find_spec("torch") is None:
        raise CLIError("nlref bench compares against PyTorch: pip install torch")
    if backend != "numpy":
        load_backend(backend)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="time and peak memory of nlref against PyTorch eager (forward + backward)",
        description=(
            "Benchmark nlref against PyTorch eager doing the same math, each in its own "
            "process: float32, same threads, warm-up, then alternating runs; prints median "
            "time, ratio, peak memory, fraction of the measured sgemm rate and the targets."
        ),
    )
    p.add_argument(
        "--case",
        action="append",
        choices=list(CASES),
        metavar="NAME",
        help="case to run (repeatable; default the three targets; --list shows all)",
    )
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument(
        "--backend",
        default="numpy",
        choices=("numpy", "cupy"),
        help="numpy (CPU, against torch on the CPU) or cupy (GPU, against torch on CUDA)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="threads for both sides (default all cores)"
    )
    p.add_argument("--repeats", type=int, default=5, help="timed runs per side (>= 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of inputs and weights")
    p.add_argument(
        "--pause",
        type=float,
        default=0.5,
        help="seconds between two runs, for the other side's threads to go idle (0.5)",
    )
    p.add_argument("--json", metavar="PATH", help="also write all results as JSON to PATH")
    p.add_argument(
        "--check", action="store_true", help="exit with status 1 when a target is missed"
    )
    p.set_defaults(func=_cmd_bench)
