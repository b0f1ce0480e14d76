"""``nlref bench``: time and memory of nlref against PyTorch eager doing the same math.

Each side runs in its own fresh process, so that its peak memory is its own: the nlref
process imports only nlref and NumPy (CuPy with ``--backend cupy``), the PyTorch process
imports PyTorch. Both use float32, the same inputs and weights and the same thread count,
run forward plus backward, warm up, and then alternate, one run each at a time, for
``--repeats`` runs; the table gives the medians::

    nlref bench                          # the default cases (nlref bench --list)
    nlref bench --case eg-1k --repeats 9 --json bench.json
    nlref bench --backend cupy           # CuPy against PyTorch on the GPU
    nlref bench --scaling --out scaling.png          # time and memory against N
    nlref bench --scaling --sizes 16 32 64 --chunk-size 64

Columns: median time; time / the PyTorch time; peak memory (resident set of the whole
process; on the GPU, the library's memory pool) and its ratio to PyTorch's; the fraction
of the machine's sgemm rate achieved and the time as a multiple of the GEMM floor (the
case's matrix-product FLOPs at that rate); the largest difference of any output or
gradient from PyTorch. Benchmarks are not tests: the exit status is 0 after a run, 2 on a
usage error. The parts live in :mod:`nlref.bench`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path
from typing import Any, TextIO

from . import CLIError, load_backend

__all__ = ["add_parser"]


def _check_args(args: argparse.Namespace) -> None:
    """Refuse bad values with one line each (exit status 2)."""
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be an int >= 1, got {args.threads}")
    minimum = 1 if args.scaling else 5
    if args.repeats is not None and args.repeats < minimum:
        what = "with --scaling" if args.scaling else "for medians that mean something"
        raise CLIError(f"--repeats must be at least {minimum} {what}, got {args.repeats}")
    if args.warmup is not None and args.warmup < 0:
        raise CLIError(f"--warmup must be >= 0, got {args.warmup}")
    if args.seed < 0:
        raise CLIError(f"--seed must be >= 0, got {args.seed}")
    if not (math.isfinite(args.pause) and args.pause >= 0):
        raise CLIError(f"--pause must be a finite number of seconds >= 0, got {args.pause}")
    if args.scaling:
        if args.case:
            raise CLIError("--case and --scaling do not go together")
        if args.sizes is not None and any(s < 2 for s in args.sizes):
            raise CLIError(f"--sizes are sides S of S x S inputs, each >= 2, got {args.sizes}")
        if args.chunk_size is not None and args.chunk_size < 1:
            raise CLIError(f"--chunk-size must be an int >= 1, got {args.chunk_size}")
    else:
        given = [
            flag
            for flag, value in (
                ("--sizes", args.sizes),
                ("--out", args.out),
                ("--pairwise", args.pairwise),
                ("--chunk-size", args.chunk_size),
            )
            if value is not None
        ]
        if given:
            raise CLIError(f"{', '.join(given)} only go with --scaling")


def _check_available(args: argparse.Namespace) -> None:
    if importlib.util.find_spec("torch") is None:
        raise CLIError("nlref bench compares against PyTorch: pip install 'nlref[bench]'")
    if args.backend != "numpy":
        load_backend(args.backend)
    if args.scaling:
        from ..bench.twin import UnknownVariantError, formula

        if importlib.util.find_spec("matplotlib") is None:
            raise CLIError(
                "nlref bench --scaling draws with matplotlib: pip install 'nlref[bench]'"
            )
        if args.pairwise is not None:
            try:
                formula(args.pairwise)
            except UnknownVariantError as err:
                raise CLIError(str(err)) from None


def _write_json(path: str, report: dict[str, Any]) -> None:
    try:
        Path(path).write_text(json.dumps(report, indent=2) + "\n")
    except OSError as err:
        raise CLIError(f"cannot write --json {path}: {err}") from err


def _cmd_bench(args: argparse.Namespace, out: TextIO) -> int:
    from ..bench import CASES
    from ..bench.worker import WorkerError

    if args.list:
        for case in CASES.values():
            mark = "" if case.default else "  (not run by default)"
            print(f"{case.name:<16} {case.describe()}; vs {case.reference}{mark}", file=out)
        return 0
    _check_args(args)
    _check_available(args)
    try:
        if args.scaling:
            return _scaling(args, out)
        from ..bench import format_report, run_bench

        report = run_bench(
            args.case or [n for n, c in CASES.items() if c.default],
            backend=args.backend,
            threads=args.threads,
            repeats=5 if args.repeats is None else args.repeats,
            warmup=2 if args.warmup is None else args.warmup,
            seed=args.seed,
            pause=args.pause,
            show_progress=False if args.quiet else None,
        )
    except WorkerError as err:
        raise CLIError(str(err)) from err
    print(format_report(report), file=out)
    if args.json:
        _write_json(args.json, report)
        print(f"\nwrote {args.json}", file=out)
    return 0


def _scaling(args: argparse.Namespace, out: TextIO) -> int:
    from ..bench import format_scaling, plot_scaling, run_scaling
    from ..bench.scaling import SIZES

    report = run_scaling(
        args.sizes or SIZES,
        pairwise=args.pairwise or "embedded_gaussian",
        chunk_size=args.chunk_size or 128,
        backend=args.backend,
        threads=args.threads,
        repeats=3 if args.repeats is None else args.repeats,
        warmup=1 if args.warmup is None else args.warmup,
        seed=args.seed,
        show_progress=False if args.quiet else None,
    )
    print(format_scaling(report), file=out)
    path = args.out or "bench_scaling.png"
    try:
        plot_scaling(report, path)
    except OSError as err:
        raise CLIError(f"cannot write --out {path}: {err}") from err
    print(f"\nwrote {path}", file=out)
    if args.json:
        _write_json(args.json, report)
        print(f"wrote {args.json}", file=out)
    return 0


def add_parser(sub: Any) -> None:
    from ..bench import CASES
    from ..pairwise import names

    p = sub.add_parser(
        "bench",
        help="time and peak memory of nlref against PyTorch eager (forward + backward)",
        description=(
            "Benchmark nlref against PyTorch eager doing the same math, each in its own "
            "process: float32, same threads, warm-up, then alternating runs; prints median "
            "time, ratio to PyTorch, peak memory, the fraction of the measured sgemm rate "
            "and the time as a multiple of the GEMM floor. With --scaling, measures time "
            "and memory against N and draws them on log-log axes."
        ),
    )
    p.add_argument(
        "--case",
        action="append",
        choices=list(CASES),
        metavar="NAME",
        help="case to run (repeatable; default the three main cases; --list shows all)",
    )
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument(
        "--backend",
        default="numpy",
        choices=("numpy", "cupy"),
        help="numpy (CPU, against torch on the CPU) or cupy (GPU, against torch on CUDA)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="threads for both sides, >= 1 (default all)"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed runs per side (default 5, at least 5; with --scaling default 3)",
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed runs first (default 2; --scaling 1)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of inputs and weights, >= 0")
    p.add_argument(
        "--pause",
        type=float,
        default=0.5,
        help="seconds between two runs, for the other side's threads to go idle (0.5)",
    )
    p.add_argument("--json", metavar="PATH", help="also write all results as JSON to PATH")
    p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    s = p.add_argument_group(
        "scaling",
        "time and peak memory against N, on log-log axes, for nlref (materialised), "
        "nlref chunked and torch eager; B=1, C=64, each measurement in its own process",
    )
    s.add_argument("--scaling", action="store_true", help="measure and plot the scaling")
    s.add_argument(
        "--sizes",
        nargs="+",
        type=int,
        metavar="S",
        help="sides S of the S x S inputs, N = S*S (default 16 32 48 64 96)",
    )
    s.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="queries per tile of the chunked path (default 128)",
    )
    s.add_argument(
        "--pairwise",
        choices=names(),
        metavar="NAME",
        help="pairwise function (default embedded_gaussian)",
    )
    s.add_argument("--out", metavar="PNG", help="where to draw (default bench_scaling.png)")
    p.set_defaults(func=_cmd_bench)
