"""``nlref bench`` machinery on a tiny case: the two sides compute the same numbers.

Benchmarks are not tests, so nothing here asserts a time. What is checked: both
subprocesses run, the PyTorch reference (eager and materialising) computes the same
outputs and gradients as nlref, peak memory and timings are reported, the targets are
evaluated, and the JSON report has what the docs describe.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from nlref.cli import main
from nlref.commands.bench import CASES, BenchCase, format_report, run_bench

from .conftest import require

TINY = {
    "eg": BenchCase("tiny-eg", "embedded_gaussian", (2, 8, 6, 5), max_ratio=1e9, max_floor=1e9),
    "concat": BenchCase(
        "tiny-concat",
        "concatenation",
        (2, 8, 4, 4),
        reference="torch_materialising",
        sub_sample=(2, 2),
        min_speedup=0.0,
        min_memory_ratio=0.0,
    ),
}


@pytest.fixture(scope="module")
def report() -> dict:
    require("torch")
    return run_bench(
        list(TINY.values()), threads=1, repeats=5, warmup=1, sgemm_size=64, seed=3, pause=0.0
    )


def test_both_sides_compute_the_same_numbers(report: dict) -> None:
    for row in report["cases"]:
        assert set(row["max_rel_diff_per_tensor"]) >= {"z", "dx", "g.weight", "z.weight"}
        assert row["max_rel_diff"] < 1e-3, row["max_rel_diff_per_tensor"]


def test_timings_memory_and_targets_are_reported(report: dict) -> None:
    assert report["threads"] == 1 and report["sgemm_rate_gflops"] > 0
    for row in report["cases"]:
        for side in ("nlref", "reference"):
            res = row[side]
            assert len(res["times_s"]) == 5 and all(t > 0 for t in res["times_s"])
            assert res["peak_rss"] >= res["setup_rss"] > 0
            assert res["x_floor"] > 0 and res["sgemm_fraction"] > 0
        assert row["ratio"] == pytest.approx(
            row["nlref"]["median_s"] / row["reference"]["median_s"]
        )
        assert row["targets"] and all(t["met"] for t in row["targets"])
    json.dumps(report)  # JSON-ready
    table = format_report(report)
    assert "torch materialising" in table and "tiny-eg" in table and "NOT MET" not in table


def test_cli_lists_the_cases(tmp_path: Path) -> None:
    out = io.StringIO()
    import sys

    saved, sys.stdout = sys.stdout, out
    try:
        assert main(["bench", "--list"]) == 0
    finally:
        sys.stdout = saved
    for name in ("eg-1k", "concat-1k", "eg-16k"):
        assert name in out.getvalue() and CASES[name].default
