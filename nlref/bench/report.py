"""``nlref bench``'s measurement of the cases and its report.

:func:`run_bench` measures the cases (each side in its own worker process, alternating
runs) and returns a JSON-ready dict; :func:`format_report` turns it into the table.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._table import format_table
from ..progress import progress
from .cases import CASES, REFERENCE_LABELS, BenchCase
from .worker import Worker, sgemm

__all__ = ["SideResult", "format_report", "run_bench", "run_case"]

MiB = 2**20
WIDTH = 100  # columns of the text around the table


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
        """The median time, in seconds."""
        return statistics.median(self.times)


def compare(ours: Path, theirs: Path) -> dict[str, float]:
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
    bar: Any = None,
) -> dict[str, Any]:
    """Benchmark one case: both sides in their own processes, alternating runs.

    ``pause`` seconds pass between two runs, so that the worker threads of one side
    (OpenMP and OpenBLAS keep spinning for a while after a parallel region) are idle
    before the other side starts. ``bar``, a :func:`nlref.progress.progress` bar, advances
    by one per timed run.
    """
    results = {
        "nlref": SideResult(f"nlref ({backend})"),
        "reference": SideResult(REFERENCE_LABELS[case.reference]),
    }
    sides = {"nlref": "nlref", "reference": "torch"}
    workers: dict[str, Worker] = {}
    try:
        for key, side in sides.items():  # one after the other: warm-ups never overlap
            if bar is not None:
                bar.set_description(f"{case.name}: warming up {results[key].label}")
            spec = {
                "side": side,
                "case": case.to_json(),
                "backend": backend,
                "threads": threads,
                "warmup": warmup,
                "seed": seed,
                "out": str(workdir / f"{case.name}-{key}.npz"),
            }
            workers[key] = Worker(spec)
            workers[key].read()  # ready
        if bar is not None:
            bar.set_description(case.name)
        order = list(sides)
        for i in range(repeats):
            for key in order if i % 2 == 0 else order[::-1]:  # alternate who goes first
                time.sleep(pause)
                results[key].times.append(float(workers[key].ask("run")["time"]))
                if bar is not None:
                    bar.update(1)
        for key, worker in workers.items():
            reply = worker.ask("finish")
            result = results[key]
            result.peak_rss, result.setup_rss = reply["peak_rss"], reply["setup_rss"]
            result.peak_device = reply.get("peak_device")
            result.info = {k: v for k, v in reply.items() if not hasattr(result, k)}
    finally:
        for worker in workers.values():
            worker.close()
    diffs = compare(workdir / f"{case.name}-nlref.npz", workdir / f"{case.name}-reference.npz")
    return {"results": results, "max_rel_diff": diffs}


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
    show_progress: bool | None = None,
) -> dict[str, Any]:
    """Run the cases (names of :data:`~nlref.bench.cases.CASES`, or :class:`BenchCase`).

    Parameters
    ----------
    cases : sequence
    backend : {"numpy", "cupy"}
        nlref on NumPy against torch on the CPU, or on CuPy against torch on CUDA.
    threads : int or None
        Threads of both sides (None: every CPU).
    repeats, warmup : int
        Timed runs per side, and untimed runs first.
    seed : int
        Seed of the inputs and weights.
    sgemm_size : int or None
        Size of the square product that measures the sgemm rate (None: 2048 on the CPU,
        8192 on the GPU).
    pause : float
        Seconds between two runs.
    show_progress : bool or None
        A progress bar on stderr (None: when stderr is a terminal).

    Returns
    -------
    dict
        Everything, JSON-ready (what ``--json`` writes).
    """
    from .. import __version__
    from ..engine.cost import gemm_flops

    threads = threads or os.cpu_count() or 1
    resolved = [CASES[c] if isinstance(c, str) else c for c in cases]
    with progress(
        total=len(resolved) * 2 * repeats, desc="sgemm rate", unit="run", enabled=show_progress
    ) as bar:
        sgemm_rates = {
            ("cupy" if backend == "cupy" else "numpy"): sgemm(
                "numpy", backend, threads, sgemm_size
            ),
            "torch": sgemm("torch", backend, threads, sgemm_size),
        }
        rate = max(sgemm_rates.values())
        report: dict[str, Any] = {
            "nlref": __version__,
            "backend": backend,
            "dtype": "float32",
            "threads": threads,
            "repeats": repeats,
            "warmup": warmup,
            "pause_s": pause,
            "machine": machine(backend),
            "sgemm_gflops": sgemm_rates,
            "sgemm_rate_gflops": rate,
            "cases": [],
        }
        with tempfile.TemporaryDirectory(prefix="nlref-bench-") as tmp:
            for case in resolved:
                measured = run_case(
                    case,
                    backend=backend,
                    threads=threads,
                    repeats=repeats,
                    warmup=warmup,
                    seed=seed,
                    workdir=Path(tmp),
                    pause=pause,
                    bar=bar,
                )
                report["cases"].append(_row(case, measured, rate, gemm_flops))
    return report


def _row(case: BenchCase, measured: dict[str, Any], rate: float, gemm_flops: Any) -> dict:
    cfg = case.config()
    chunked = measured["results"]["nlref"].info.get("chunk_size") is not None
    flops = gemm_flops(cfg, case.shape)
    floor = flops["total"] / (rate * 1e9)
    row: dict[str, Any] = {
        "case": case.name,
        "description": case.describe(),
        "shape": list(case.shape),
        "gemm_flops": flops["total"],
        "gemm_flops_executed_by_nlref": gemm_flops(cfg, case.shape, chunked=chunked)["total"],
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
    row["memory_ratio"] = row["nlref"]["peak_bytes"] / row["reference"]["peak_bytes"]
    row["max_rel_diff_per_tensor"] = measured["max_rel_diff"]
    row["max_rel_diff"] = max(measured["max_rel_diff"].values())
    return row


def machine(backend: str) -> dict[str, Any]:
    """CPU model, cores, Python and NumPy versions; the GPU and CuPy with ``"cupy"``."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}
    info["numpy"] = np.__version__
    if backend == "cupy":
        try:
            import cupy

            props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
            name = props["name"]
            info["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
            info["cupy"] = cupy.__version__
        except Exception as err:  # report, do not fail, the header
            info["gpu"] = f"unknown ({err})"
    return info


def fmt_time(seconds: float) -> str:
    """``41.3 ms`` below 10 s, else ``12.34 s``."""
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def fmt_bytes(n: int | None) -> str:
    """KiB below 1 MiB, MiB below 10 GiB (a decimal below 10 MiB), else GiB; ``-`` for None."""
    if n is None:
        return "-"
    if n < MiB:
        return f"{n / 2**10:.0f} KiB"
    if n < 10 * MiB:
        return f"{n / MiB:.1f} MiB"
    return f"{n / MiB:.0f} MiB" if n < 10 * 2**30 else f"{n / 2**30:.1f} GiB"


def fmt_threads(n: int) -> str:
    """``1 thread``, ``2 threads``."""
    return "1 thread" if n == 1 else f"{n} threads"


def title(report: dict[str, Any], command: str) -> str:
    """The first line of a report: version, command, backend, and the machine."""
    m = report["machine"]
    where = m.get("gpu") if report["backend"] == "cupy" else m["cpu"]
    if report["backend"] != "cupy":
        where += f", {fmt_threads(report['threads'])}"
    return f"nlref {report['nlref']} {command}: {report['backend']} float32 on {where}"


def format_report(report: dict[str, Any]) -> str:
    """The table printed by ``nlref bench``, with its header and a key to the columns."""
    gpu = report["backend"] == "cupy"
    method = (
        f"forward+backward, median of {report['repeats']} alternating runs after "
        f"{report['warmup']} warm-up ({report['pause_s']:g} s apart), each side in its own process"
    )
    lines = [
        title(report, "bench"),
        *textwrap.wrap(method, WIDTH),
        "sgemm: "
        + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in report["sgemm_gflops"].items())
        + f" -> machine rate {report['sgemm_rate_gflops']:.1f} GFLOP/s",
        "",
    ]
    mem = "peak GPU" if gpu else "peak RSS"
    header = ["case", "impl", "time", "ratio", mem, "mem ratio", "%sgemm", "x floor", "rel diff"]
    rows = []
    for row in report["cases"]:
        ref = row["reference"]
        for key in ("nlref", "reference"):
            side = row[key]
            rows.append(
                [
                    row["case"] if key == "nlref" else "",
                    side["label"],
                    fmt_time(side["median_s"]),
                    f"{side['median_s'] / ref['median_s']:.3f}",
                    fmt_bytes(side["peak_bytes"]),
                    f"{side['peak_bytes'] / ref['peak_bytes']:.3f}",
                    f"{side['sgemm_fraction'] * 100:.0f}%",
                    f"{side['x_floor']:.2f}",
                    f"{row['max_rel_diff']:.1e}" if key == "nlref" else "(reference)",
                ]
            )
    lines += format_table(header, rows, align="<<>>>>>>>")
    lines += ["", "cases:"]
    for row in report["cases"]:
        plan = row["nlref"]["info"].get("plan", "")
        text = (
            f"{row['case']}: {row['description']}; GEMM {row['gemm_flops'] / 1e9:.2f} GFLOP, "
            f"floor {fmt_time(row['gemm_floor_s'])}; nlref: {plan}"
        )
        lines += textwrap.wrap(text, WIDTH, initial_indent="  ", subsequent_indent="    ")
    pool = "the library's memory pool" if gpu else "the whole process"
    key = (
        "ratio: time / the PyTorch time. mem ratio: peak memory / the PyTorch peak "
        f"({pool}). GEMM floor: the case's matrix-product FLOPs at the machine's sgemm "
        "rate; x floor = time / floor; %sgemm = floor / time. rel diff: the largest "
        "difference of any output or gradient from PyTorch, relative to that tensor's "
        "largest magnitude."
    )
    lines += ["", *textwrap.wrap(key, WIDTH)]
    return "\n".join(lines)
