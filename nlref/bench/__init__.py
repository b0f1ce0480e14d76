"""``nlref bench``: nlref against PyTorch eager doing the same math, in time and memory.

- :mod:`~nlref.bench.cases`: the benchmark cases (:class:`BenchCase`, :data:`CASES`);
- :mod:`~nlref.bench.twin`: the block in PyTorch eager with autograd, written
  independently of nlref; the benchmark's peer and the tests' reference;
- :mod:`~nlref.bench.worker`: one side of one measurement in a fresh process;
- :mod:`~nlref.bench.report`: the measurement of the cases and the table
  (:func:`run_bench`, :func:`format_report`);
- :mod:`~nlref.bench.scaling`: time and memory against N on log-log axes
  (:func:`run_scaling`, :func:`plot_scaling`).

Benchmarks are not tests: nothing here asserts a time. PyTorch (the ``bench`` extra) is
needed to run them, not to import this package.
"""

from __future__ import annotations

from .cases import CASES, BenchCase
from .report import format_report, run_bench
from .scaling import format_scaling, plot_scaling, run_scaling

__all__ = [
    "CASES",
    "BenchCase",
    "format_report",
    "format_scaling",
    "plot_scaling",
    "run_bench",
    "run_scaling",
]
