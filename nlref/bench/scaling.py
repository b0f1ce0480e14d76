"""``nlref bench --scaling``: time and peak memory against N, drawn on log-log axes.

Three implementations of the same block (forward + backward, float32) run at a few sizes
N = S × S:

- **nlref**, the whole (B, N, N′) attention materialised (``chunk_size=N``);
- **nlref chunked**, tiles of ``chunk_size`` queries recomputed in the backward;
- **torch eager**, the PyTorch twin (:mod:`nlref.bench.twin`) with autograd.

Each measurement (one implementation at one size) runs in its own worker process
(:mod:`nlref.bench.worker`), so that its memory is its own. Time is the median of the
timed runs; memory is the peak above what the process held before its first forward pass,
so that the imports and the inputs do not hide the block's own working memory. The
materialised paths hold O(N²) memory; the chunked path holds O(N), at O(N²) time like
the others. :func:`plot_scaling` draws both, with the fitted slopes.
"""

from __future__ import annotations

import os
import statistics
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._table import format_table
from ..progress import progress
from .cases import BenchCase
from .report import WIDTH, fmt_bytes, fmt_threads, fmt_time, machine, title
from .worker import Worker, WorkerError

__all__ = ["IMPLEMENTATIONS", "SIZES", "format_scaling", "plot_scaling", "run_scaling", "slope"]

#: Default sides S of the S × S inputs: N from 256 to 9,216.
SIZES = (16, 32, 48, 64, 96)

#: Key -> label of the three implementations, in plotting order.
IMPLEMENTATIONS = {
    "nlref": "nlref (materialised)",
    "nlref_chunked": "nlref chunked",
    "torch": "torch eager",
}


def run_scaling(
    sizes: Sequence[int] = SIZES,
    *,
    pairwise: str = "embedded_gaussian",
    channels: int = 64,
    batch: int = 1,
    chunk_size: int = 128,
    backend: str = "numpy",
    threads: int | None = None,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    show_progress: bool | None = None,
) -> dict[str, Any]:
    """Measure the three implementations at inputs (batch, channels, S, S), S in ``sizes``.

    A measurement that fails (the materialised attention does not fit in memory, say) is
    recorded with its error and left out of the plot; the others go on.

    Returns
    -------
    dict
        JSON-ready: the settings, the machine, and ``points``: one dict per implementation
        and size with ``impl``, ``side``, ``n``, ``times_s``, ``median_s``, ``work_peak``
        (bytes above the inputs; the library pool's on the GPU), ``peak_rss``, ``n_tiles``
        and ``error`` (None, or why it failed).
    """
    from .. import __version__

    threads = threads or os.cpu_count() or 1
    report: dict[str, Any] = {
        "nlref": __version__,
        "backend": backend,
        "dtype": "float32",
        "pairwise": pairwise,
        "batch": batch,
        "channels": channels,
        "chunk_size": chunk_size,
        "threads": threads,
        "repeats": repeats,
        "warmup": warmup,
        "machine": machine(backend),
        "points": [],
    }
    jobs = [(s, impl) for s in sizes for impl in IMPLEMENTATIONS]
    bar = progress(jobs, desc="scaling", unit="measurement", enabled=show_progress)
    for side, impl in bar:
        case = BenchCase(f"scaling-{side}", pairwise, (batch, channels, side, side))
        n = side * side
        bar.set_description(f"N={n}: {IMPLEMENTATIONS[impl]}")
        spec = {
            "side": "torch" if impl == "torch" else "nlref",
            "case": case.to_json(),
            "backend": backend,
            "threads": threads,
            "warmup": warmup,
            "seed": seed,
            "out": None,
            "work_memory": True,
            "chunk_size": chunk_size if impl == "nlref_chunked" else n,
        }
        point: dict[str, Any] = {"impl": impl, "side": side, "n": n, "error": None}
        worker = Worker(spec)
        try:
            worker.read()  # ready
            point["times_s"] = [float(worker.ask("run")["time"]) for _ in range(repeats)]
            reply = worker.ask("finish")
        except WorkerError as err:
            point["error"] = str(err).split("\n")[-1][:300]
        else:
            point["median_s"] = statistics.median(point["times_s"])
            device = reply.get("work_device")
            point["work_peak"] = device if device is not None else reply.get("work_peak")
            point["peak_rss"] = reply["peak_rss"]
            point["n_tiles"] = reply.get("n_tiles")
        finally:
            worker.close()
        report["points"].append(point)
    report["slopes"] = {
        impl: {
            "time": slope(_series(report, impl, "median_s")),
            "memory": slope(_series(report, impl, "work_peak")),
        }
        for impl in IMPLEMENTATIONS
    }
    return report


def _series(report: dict[str, Any], impl: str, key: str) -> list[tuple[int, float]]:
    """(N, value) of one implementation, where measured and positive (a log axis)."""
    return [
        (p["n"], p[key])
        for p in report["points"]
        if p["impl"] == impl and p["error"] is None and p.get(key) and p[key] > 0
    ]


def slope(points: Sequence[tuple[float, float]]) -> float | None:
    """The log-log slope of (N, value) over the larger half of the sizes (at least two).

    Small sizes are dominated by fixed costs (Python, a library's buffers); the upper half
    shows the growth: about 2 for O(N²), 1 for O(N).
    """
    points = sorted(points)
    if len(points) < 2:
        return None
    upper = points[len(points) // 2 :] if len(points) >= 4 else points
    x = np.log([p[0] for p in upper])
    y = np.log([p[1] for p in upper])
    return float(np.polyfit(x, y, 1)[0])


def format_scaling(report: dict[str, Any]) -> str:
    """The measurements as a table: time and memory per implementation, per N."""
    setting = (
        f"{report['pairwise']}, B={report['batch']}, C={report['channels']}, S x S inputs, "
        f"forward+backward, median of {report['repeats']} runs after {report['warmup']} "
        f"warm-up, each measurement in its own process; chunked: tiles of "
        f"{report['chunk_size']} queries"
    )
    lines = [title(report, "bench --scaling"), *textwrap.wrap(setting, WIDTH), ""]
    header = ["N", "S", "implementation", "time", "memory", "tiles"]
    rows = []
    for p in sorted(report["points"], key=lambda p: p["n"]):
        if p["error"] is not None:
            cells = ["failed", "failed", "-"]
        else:
            tiles = "-" if p.get("n_tiles") is None else p["n_tiles"]
            cells = [fmt_time(p["median_s"]), fmt_bytes(p.get("work_peak")), tiles]
        rows.append([p["n"], f"{p['side']}x{p['side']}", IMPLEMENTATIONS[p["impl"]], *cells])
    lines += format_table(header, rows, align=">><>>>")
    lines.append("")
    lines.append(f"memory: {_memory_label(report)}.")
    lines.append("log-log slopes over the larger sizes (2: O(N^2), 1: O(N)):")
    for impl, label in IMPLEMENTATIONS.items():
        s = report["slopes"][impl]
        lines.append(f"  {label}: time {_fmt_slope(s['time'])}, memory {_fmt_slope(s['memory'])}")
    for p in report["points"]:
        if p["error"] is not None:
            lines.append(f"  {IMPLEMENTATIONS[p['impl']]} at N={p['n']} failed: {p['error']}")
    return "\n".join(lines)


def _memory_label(report: dict[str, Any]) -> str:
    if report["backend"] == "cupy":
        return "the GPU memory pool's peak during one forward + backward, above its use before"
    return "the peak resident memory during one forward + backward, above the process's before"


def _fmt_slope(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def plot_scaling(report: dict[str, Any], path: str | Path, *, dpi: int = 120) -> Path:
    """Draw time and peak memory against N on log-log axes, to the PNG ``path``.

    Each panel has one line per implementation, labelled with its fitted slope, and dashed
    guides of slope 2 (O(N²)) and 1 (O(N)).

    Raises
    ------
    ImportError
        If matplotlib is not installed.
    """
    from matplotlib.ticker import NullFormatter

    from ..viz import new_figure

    fig = new_figure(11, 4.6)
    ax_time, ax_mem = fig.subplots(1, 2)
    styles = {"nlref": "o-", "nlref_chunked": "s-", "torch": "^-"}
    panels = ((ax_time, "median_s", 1.0, "time (s)"), (ax_mem, "work_peak", 2**-20, "MiB"))
    for ax, key, unit, ylabel in panels:
        every: list[tuple[int, float]] = []
        for impl, label in IMPLEMENTATIONS.items():
            series = _series(report, impl, key)
            if not series:
                continue
            every += series
            fitted = slope(series)
            shown = f"{label} (slope {fitted:.2f})" if fitted is not None else label
            ax.plot(
                [n for n, _ in series], [v * unit for _, v in series], styles[impl], label=shown
            )
        if every:
            _guides(ax, every, unit)
        ax.set_xscale("log")
        ax.set_yscale("log")
        sizes = sorted({n for n, _ in every})
        ax.set_xticks(sizes, [f"{n:,}" for n in sizes])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("N (query positions, S x S)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax_time.set_title("time, forward + backward")
    pool = "GPU pool" if report["backend"] == "cupy" else "resident memory"
    ax_mem.set_title(f"peak {pool} of one forward + backward")
    fig.suptitle(
        f"Non-local block, {report['pairwise']}, B={report['batch']}, C={report['channels']}, "
        f"float32, {report['backend']}, {fmt_threads(report['threads'])}; "
        f"chunked: tiles of {report['chunk_size']} queries",
        fontsize=10,
    )
    out = Path(path)
    fig.savefig(out, dpi=dpi)
    return out


def _guides(ax: Any, points: list[tuple[int, float]], unit: float) -> None:
    """Dashed lines of slope 2 and 1 through the largest value at the largest N."""
    n_min = min(n for n, _ in points)
    n_max = max(n for n, _ in points)
    top = max(v for n, v in points if n == n_max) * unit
    xs = np.array([n_min, n_max], dtype=float)
    for power, text in ((2, "∝ N²"), (1, "∝ N")):
        ys = top * (xs / n_max) ** power
        ax.plot(xs, ys, "--", color="grey", linewidth=0.8, alpha=0.7)
        ax.annotate(text, (xs[0], ys[0]), fontsize=8, color="grey", va="bottom")
