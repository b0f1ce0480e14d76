"""``nlref compare`` (real modules) and ``nlref vectors`` through ``nlref.cli.main``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from nlref import cli

from .conftest import require
from .test_oracle_support import timm_nonlocal_attn


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_compare_mmcv_concatenation_reports_the_backward_failure(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    require("torch"), require("mmcv")
    report = tmp_path / "report.json"
    code, out, _ = run(
        capsys,
        "compare",
        "--layout",
        "mmcv",
        "--pairwise",
        "concatenation",
        "--dims",
        "2",
        "--sub-sample",
        "--json",
        str(report),
    )
    assert code == 1
    assert "nlref oracle: NonLocal2d (layout mmcv)" in out
    assert "module error in backward: RuntimeError: one of the variables needed" in out
    assert "FAIL: the module's backward raised; what it computed matches nlref" in out
    doc = json.loads(report.read_text())
    assert doc["ok"] is False and doc["module_error_stage"] == "backward"
    statuses = {r["name"]: r["status"] for r in doc["rows"]}
    assert statuses["attention"] == statuses["z"] == "ok" and statuses["dx"] == "not run"


@pytest.mark.parametrize(
    "argv",
    [
        ("--layout", "mmcv", "--pairwise", "dot_product", "--dims", "2", "--sub-sample"),
        ("--layout", "mmcv", "--pairwise", "gaussian", "--dims", "1", "--norm", "bn", "--eval"),
        ("--layout", "pytorchvideo", "--sub-sample"),
        ("--layout", "pytorchvideo", "--pairwise", "dot_product", "--norm", "none"),
    ],
    ids=["mmcv-dot-2d", "mmcv-gauss-1d-bn-eval", "pytorchvideo-softmax", "pytorchvideo-dot"],
)
def test_compare_passing_modules(capsys: pytest.CaptureFixture[str], argv: tuple) -> None:
    require("torch"), require(argv[1])
    code, out, err = run(capsys, "compare", *argv)
    assert code == 0, out + err
    assert "PASS:" in out and "FAIL" not in out


def test_compare_timm(capsys: pytest.CaptureFixture[str]) -> None:
    timm_nonlocal_attn()  # required in CI, loaded without torchvision
    code, out, _ = run(capsys, "compare", "--layout", "timm", "--channels", "16")
    assert code == 0 and "PASS:" in out and "attention: not exposed by NonLocalAttn" in out


def test_compare_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    require("torch"), require("mmcv")
    code, _, err = run(capsys, "compare", "--layout", "mmcv", "--dims", "2", "--spatial", "5")
    assert code == 2 and "--spatial has 1 sizes but --dims is 2" in err
    code, _, err = run(capsys, "compare", "--layout", "pytorchvideo", "--pairwise", "gaussian")
    assert code == 2 and "pytorchvideo has pairwise" in err
    code, _, err = run(capsys, "compare", "--layout", "alexhex7")
    assert code == 2 and "invalid choice" in err


def test_vectors_out_and_check(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_dir = tmp_path / "golden"
    code, out, _ = run(
        capsys,
        "vectors",
        "--out",
        str(out_dir),
        "--preset",
        "timm",
        "--preset",
        "caffe2",
        "--pairwise",
        "embedded_gaussian",
    )
    assert code == 0 and "wrote 12 cases" in out and "caffe2 8, timm 4" in out
    code, out, _ = run(capsys, "vectors", "--check", str(out_dir))
    assert code == 0 and "12 cases" in out and out.rstrip().endswith("PASS")
    victim = sorted(out_dir.glob("*.npz"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside an array
    victim.write_bytes(bytes(data))
    code, out, _ = run(capsys, "vectors", "--check", str(out_dir))
    assert code == 1 and f"FAIL {victim.stem}:" in out
    code, _, err = run(capsys, "vectors", "--check", str(tmp_path / "missing"))
    assert code == 2 and "manifest.json not found" in err
    code, _, err = run(capsys, "vectors")
    assert code == 2 and "one of the arguments --out --check is required" in err


@pytest.mark.parametrize(
    "command",
    [
        "nlref compare --layout mmcv --pairwise embedded_gaussian --dims 2 --sub-sample",
        "nlref compare --layout mmcv --pairwise concatenation --dims 2 --sub-sample",
    ],
)
def test_readme_shows_the_current_output(capsys: pytest.CaptureFixture[str], command: str) -> None:
    # the README's two example outputs are what the command prints today, up to the
    # rounding-level digits of the error columns (those depend on the BLAS build)
    require("torch"), require("mmcv")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split(f"$ {command}\n", 1)[1].split("```", 1)[0].rstrip("\n")
    _, out, _ = run(capsys, *command.split()[1:])

    def mask(text: str) -> list[str]:
        masked = re.sub(r"\d\.\de[+-]\d\d", "#", text)
        masked = re.sub(r"(worst max rel err #: )\S+", r"\1#", masked)
        return [re.sub(r"version \d+", "version #", line).rstrip() for line in masked.splitlines()]

    assert mask(block) == mask(out.rstrip("\n"))
