"""Run ``nlref bench`` and keep its results under ``benchmarks/results/``.

Usage (from the repository root)::

    python benchmarks/run.py                    # CPU: the three main cases, all cores
    python benchmarks/run.py --backend cupy     # GPU: CuPy against PyTorch CUDA
    python benchmarks/run.py --case eg-1k --repeats 9
    python benchmarks/run.py --scaling          # time and memory against N, and the plot

Every argument is passed to ``nlref bench``; the table goes to the terminal and to
``results/<backend>-<date>.txt``, the JSON to ``results/<backend>-<date>.json`` and, with
``--scaling``, the plot to ``results/<backend>-<date>.png``. The repository root is put on
``sys.path``, so nlref does not need to be installed (only its dependencies, and the
``bench`` extra: PyTorch, threadpoolctl, matplotlib).
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT))
    from nlref.cli import main as nlref_main

    backend = argv[argv.index("--backend") + 1] if "--backend" in argv else "numpy"
    stem = RESULTS / f"{backend}-{time.strftime('%Y%m%d-%H%M%S')}"
    RESULTS.mkdir(exist_ok=True)
    args = ["bench", *argv]
    if "--json" not in argv:
        args += ["--json", str(stem.with_suffix(".json"))]
    if "--scaling" in argv and "--out" not in argv:
        args += ["--out", str(stem.with_suffix(".png"))]
    table = io.StringIO()
    original, sys.stdout = sys.stdout, table
    try:
        status = nlref_main(args)
    finally:
        sys.stdout = original
    print(table.getvalue(), end="")
    stem.with_suffix(".txt").write_text(table.getvalue())
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
