"""Run ``nlref bench`` and keep its results under ``benchmarks/results/``.

Usage (from the repository root)::

    python benchmarks/run.py                    # CPU: the three targets, all cores
    python benchmarks/run.py --backend cupy     # GPU: CuPy against PyTorch CUDA
    python benchmarks/run.py --case eg-1k --repeats 9

Every argument is passed to ``nlref bench``; the table goes to the terminal and to
``results/<backend>-<date>.txt``, the JSON to ``results/<backend>-<date>.json``. The
repository root is put on ``sys.path``, so nlref does not need to be installed (only its
dependencies, NumPy and array-api-compat, and PyTorch for the reference).
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
