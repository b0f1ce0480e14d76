"""``nlref compare`` (real modules) and ``nlref vectors`` through ``nlref.cli.main``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from .conftest import require, run_cli
from .test_oracle_support import timm_nonlocal_attn


def test_compare_mmcv_concatenation_reports_the_backward_failure(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    require("torch"), require("mmcv")
    report = tmp_path / "report.json"
    code, out, _ = run_cli(
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
    assert statuses["attention"] == statuses["z"] == "ok" and statuses["dx"] == "not captured"


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
    code, out, err = run_cli(capsys, "compare", *argv)
    assert code == 0, out + err
    assert "PASS:" in out and "FAIL" not in out


def test_compare_timm(capsys: pytest.CaptureFixture[str]) -> None:
    timm_nonlocal_attn()  # required in CI, loaded without torchvision
    code, out, _ = run_cli(capsys, "compare", "--layout", "timm", "--channels", "16")
    assert code == 0 and "PASS:" in out and "attention: not exposed by NonLocalAttn" in out


def test_compare_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    require("torch"), require("mmcv")
    code, _, err = run_cli(capsys, "compare", "--layout", "mmcv", "--dims", "2", "--spatial", "5")
    assert code == 2 and "--spatial has 1 sizes but --dims is 2" in err
    code, _, err = run_cli(capsys, "compare", "--layout", "pytorchvideo", "--pairwise", "gaussian")
    assert code == 2 and "pytorchvideo has pairwise" in err
    code, _, err = run_cli(capsys, "compare", "--layout", "alexhex7")
    assert code == 2 and "cannot be built from a package" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--spatial", "1", "1", "--sub-sample"), "leaves no key position for --spatial 1 1"),
        (("--channels", "0"), "--channels must be >= 1, got 0"),
        (
            ("--batch", "1", "--spatial", "1", "1", "--norm", "bn"),
            "batch norm in training mode needs more than one value per channel",
        ),
        (("--rtol", "-1"), "--rtol must be a positive number, got -1"),
        (("--spatial", "0", "3"), "--spatial sizes must be >= 1, got 0 3"),
    ],
    ids=["pool-to-nothing", "no-channels", "bn-one-value", "negative-rtol", "zero-size"],
)
def test_compare_bad_values_are_usage_errors(
    capsys: pytest.CaptureFixture[str], argv: tuple, message: str
) -> None:
    require("torch"), require("mmcv")
    code, out, err = run_cli(capsys, "compare", "--layout", "mmcv", "--dims", "2", *argv)
    assert code == 2 and out == ""
    assert err.splitlines() == [f"nlref compare: error: {err.split('error: ', 1)[1].strip()}"]
    assert message in err and "Traceback" not in err


def test_compare_low_precision_and_a_module_of_your_own(
    capsys: pytest.CaptureFixture[str],
) -> None:
    require("torch"), require("mmcv")
    code, out, _ = run_cli(
        capsys, "compare", "--layout", "mmcv", "--sub-sample", "--dtype", "float16"
    )
    assert code == 0 and "PASS: 12 tensors match in float16" in out
    argv = ["compare", "--module", "tests.oracle_blocks:make_qkv"]
    argv += ["--layout", "tests.oracle_blocks:QKV_LAYOUT", "--pairwise", "embedded_gaussian"]
    code, out, _ = run_cli(capsys, *argv, "--scale", "0.5")
    assert code == 0 and "QKVBlock (layout custom)" in out and "PASS: 15 tensors match" in out
    code, out, _ = run_cli(capsys, *argv, "--scale", "none")
    assert code == 1 and "diagnosis: scale: the module behaves as 1/√C′ = 0.5" in out
    code, _, err = run_cli(capsys, "compare", "--module", "tests.oracle_blocks:nothing")
    assert code == 2 and "cannot load --module tests.oracle_blocks:nothing" in err


def test_vectors_out_and_check(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_dir = tmp_path / "golden"
    code, out, _ = run_cli(
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
    code, out, _ = run_cli(capsys, "vectors", "--check", str(out_dir))
    assert code == 0 and "12 cases" in out and out.rstrip().endswith("PASS")
    victim = sorted(out_dir.glob("*.npz"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside an array
    victim.write_bytes(bytes(data))
    code, out, _ = run_cli(capsys, "vectors", "--check", str(out_dir))
    assert code == 1 and f"FAIL {victim.stem}:" in out
    assert re.search(rf"\n{victim.stem.split('-')[0]} +8 +\d+ +\S+ +FAIL\n", out), out
    assert re.search(r"\ntimm +4 +\d+ +\S+ +ok\n", out), out  # the other preset's cases pass
    code, _, err = run_cli(capsys, "vectors", "--check", str(tmp_path / "missing"))
    assert code == 2 and "manifest.json not found" in err
    code, _, err = run_cli(capsys, "vectors", "--out", str(out_dir), "--preset", "timm")
    assert code == 2 and "already holds golden vectors" in err and "--force" in err
    code, out, err = run_cli(
        capsys, "vectors", "--out", str(out_dir), "--preset", "timm", "--format", "onnx",
        "--force", "--quiet",
    )  # fmt: skip
    assert code == 0 and "wrote 4 cases (onnx" in out and err == ""
    assert not list(out_dir.glob("*.npz"))  # the old vectors are gone
    code, out, _ = run_cli(capsys, "vectors", "--check", str(out_dir), "--quiet")
    assert code == 0 and "4 cases (onnx)" in out and out.rstrip().endswith("PASS")
    assert re.search(r"preset +cases +tensors +worst err / tolerance +status\n-+\ntimm +4 +4 ", out)
    code, _, err = run_cli(capsys, "vectors")
    assert code == 2 and "one of the arguments --out --check is required" in err
