"""``nlref bench`` machinery on tiny cases: the two sides compute the same numbers.

Benchmarks are not tests, so nothing here asserts a time. What is checked: both worker
processes run, the PyTorch twin (eager and materialising) computes the same outputs and
gradients as nlref, peak memory and timings are reported, the report and the scaling plot
are written, and bad values of the command's flags are usage errors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from nlref.bench import CASES, BenchCase, format_report, run_bench
from nlref.bench.scaling import IMPLEMENTATIONS, plot_scaling, slope
from nlref.bench.worker import Worker, WorkerError

from .conftest import require, run_cli

TINY = [
    BenchCase("tiny-eg", "embedded_gaussian", (2, 8, 6, 5)),
    BenchCase(
        "tiny-concat", "concatenation", (2, 8, 4, 4), "torch_materialising", sub_sample=(2, 2)
    ),
]


@pytest.fixture(scope="module")
def report() -> dict:
    require("torch")
    return run_bench(TINY, threads=1, repeats=5, warmup=1, sgemm_size=64, seed=3, pause=0.0)


def test_both_sides_compute_the_same_numbers(report: dict) -> None:
    for row in report["cases"]:
        assert set(row["max_rel_diff_per_tensor"]) >= {"z", "dx", "g.weight", "z.weight"}
        assert row["max_rel_diff"] < 1e-3, row["max_rel_diff_per_tensor"]


def test_timings_memory_and_ratios_are_reported(report: dict) -> None:
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
        assert row["memory_ratio"] == pytest.approx(
            row["nlref"]["peak_bytes"] / row["reference"]["peak_bytes"]
        )
        # one thread each; nlref's plan says what it did
        assert row["nlref"]["info"]["threads"] == 1
        assert "ATTENTION_MEMORY_LIMIT" in row["nlref"]["info"]["plan"]
    json.dumps(report)  # JSON-ready


def test_the_report_shows_ratios_and_the_floor_not_targets(report: dict) -> None:
    table = format_report(report)
    assert "torch materialising" in table and "tiny-eg" in table
    text = " ".join(table.split())
    for word in ("ratio", "mem ratio", "x floor", "GEMM floor"):
        assert word in text
    for internal in ("target", "NOT MET", " met"):
        assert internal not in table
    assert max(len(line) for line in table.splitlines()[1:]) <= 100


def test_cli_lists_the_cases(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "bench", "--list")
    assert code == 0
    for name in ("eg-1k", "concat-1k", "eg-16k"):
        assert name in out and CASES[name].default


@pytest.mark.parametrize(
    "bad",
    [
        ["--threads", "0"],
        ["--threads", "-2"],
        ["--repeats", "2"],
        ["--warmup", "-1"],
        ["--seed", "-1"],
        ["--pause", "-1"],
        ["--pause", "nan"],
        ["--sizes", "8"],  # only with --scaling
        ["--scaling", "--sizes", "1"],
        ["--scaling", "--chunk-size", "0"],
        ["--scaling", "--repeats", "0"],
        ["--scaling", "--case", "eg-1k"],
    ],
)
def test_bad_values_are_usage_errors(capsys: pytest.CaptureFixture[str], bad: list[str]) -> None:
    code, out, err = run_cli(capsys, "bench", *bad)
    assert code == 2
    assert out == ""  # refused before anything ran
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("nlref bench: error: ")


def test_a_failing_worker_says_why() -> None:
    spec = {
        "side": "nlref",
        "case": {**TINY[0].to_json(), "pairwise": "no_such_variant"},
        "backend": "numpy",
        "threads": 1,
        "warmup": 0,
        "seed": 0,
        "out": None,
    }
    worker = Worker(spec)
    try:
        with pytest.raises(WorkerError, match="unknown pairwise function 'no_such_variant'"):
            worker.read()
    finally:
        worker.close()


# --------------------------------------------------------------------------- scaling


def test_slope_of_power_laws() -> None:
    ns = [256, 1024, 2304, 4096, 9216]
    assert slope([(n, 3e-9 * n * n) for n in ns]) == pytest.approx(2.0)
    # the fit uses the larger half: fixed costs at small N do not bend it
    assert slope([(n, 5e4 + 1e3 * n) for n in ns]) == pytest.approx(1.0, abs=0.15)
    assert slope([(256, 1.0)]) is None


def test_scaling_measures_plots_and_reports(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    require("torch")
    require("matplotlib")
    png, doc = tmp_path / "scaling.png", tmp_path / "scaling.json"
    argv = ["bench", "--scaling", "--sizes", "6", "--chunk-size", "8", "--repeats", "1"]
    argv += ["--warmup", "0", "--threads", "1", "--out", str(png), "--json", str(doc)]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(doc.read_text())
    points = report["points"]
    assert {(p["impl"], p["n"]) for p in points} == {(impl, 36) for impl in IMPLEMENTATIONS}
    for p in points:
        assert p["error"] is None and p["median_s"] > 0 and p["work_peak"] is not None
    tiles = {(p["impl"], p["n"]): p["n_tiles"] for p in points}
    assert tiles[("nlref", 36)] == 1 and tiles[("nlref_chunked", 36)] == 5  # ceil(36 / 8)
    for label in IMPLEMENTATIONS.values():
        assert label in out
    assert "log-log slopes" in out and f"wrote {png}" in out


def test_plot_leaves_out_failed_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require("matplotlib")
    import nlref.viz

    figures: list[Any] = []
    new_figure = nlref.viz.new_figure
    monkeypatch.setattr(
        nlref.viz, "new_figure", lambda *a: figures.append(new_figure(*a)) or figures[-1]
    )
    points = []
    for impl in IMPLEMENTATIONS:
        for n in (256, 1024, 4096):
            failed = impl == "nlref" and n == 4096
            points.append(
                {
                    "impl": impl,
                    "side": int(n**0.5),
                    "n": n,
                    "error": "MemoryLimitError: too big" if failed else None,
                    "median_s": 1e-8 * n * n,
                    "work_peak": 0 if impl == "torch" else 4 * n,  # 0: nothing to draw
                }
            )
    report = {
        "backend": "numpy",
        "pairwise": "embedded_gaussian",
        "batch": 1,
        "channels": 64,
        "threads": 2,
        "chunk_size": 128,
        "points": points,
    }
    path = plot_scaling(report, tmp_path / "synthetic.png")
    assert path.stat().st_size > 10_000

    def drawn(ax: Any) -> dict[str, list[int]]:  # label -> N of each line (guides unlabelled)
        lines = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
        return {line.get_label().split(" (slope")[0]: list(line.get_xdata()) for line in lines}

    time_panel, memory_panel = figures[0].axes
    every = [256, 1024, 4096]
    assert drawn(time_panel) == {
        "nlref (materialised)": [256, 1024], "nlref chunked": every, "torch eager": every,
    }  # fmt: skip
    assert drawn(memory_panel) == {"nlref (materialised)": [256, 1024], "nlref chunked": every}
