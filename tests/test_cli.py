"""The ``nlref`` command line: ``nlref gradcheck`` through ``main(argv)`` and the script."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import nlref
from nlref import commands
from nlref import pairwise as registry
from nlref.commands import gradcheck as gc
from nlref.pairwise import PairwiseGrads

from .conftest import require, run_cli

NAMES = registry.names()
DEFAULT_CASES_PER_VARIANT_AND_DIM = 3  # sub_sample off, on with either pool order


def table_rows(out: str) -> list[str]:
    """The body lines of the table (between the dashed rule and the first blank line)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line and set(line) == {"-"}) + 1
    body = []
    for line in lines[start:]:
        if not line.strip():
            break
        body.append(line)
    return body


def header(out: str) -> list[str]:
    lines = out.splitlines()
    rule = next(i for i, line in enumerate(lines) if line and set(line) == {"-"})
    return lines[rule - 1].split()


# ----------------------------------------------------------------------- top level


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0
    assert nlref.__version__ in out


def test_no_subcommand_prints_help_and_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys)
    assert code == 2
    assert "usage: nlref" in out
    assert "gradcheck" in out


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "gradcheck", "--help")
    assert code == 0
    for option in ("--pairwise", "--dims", "--full", "--backend", "--mode", "--json"):
        assert option in out


# ----------------------------------------------------------------------- default run


def test_default_run_passes_and_lists_every_variant(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "gradcheck")
    assert code == 0, out + err
    rows = table_rows(out)
    assert len(rows) == len(NAMES) * 3 * DEFAULT_CASES_PER_VARIANT_AND_DIM
    for name in NAMES:
        assert any(row.split()[0] == name for row in rows), name
    assert all(row.split()[-1] == "ok" for row in rows)
    assert f"{len(rows)} cases" in out
    assert out.rstrip().endswith("PASS")
    assert "worst max rel err" in out


def test_header_has_x_and_every_parameter(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "gradcheck", "--dims", "1")
    assert code == 0
    cols = header(out)
    expected = ["x", "θ.w", "θ.b", "φ.w", "φ.b", "g.w", "g.b", "w_f", "z.w", "z.b", "γ", "β"]
    assert cols[cols.index("x") : cols.index("status")] == expected
    # the fixed settings of the default grid are stated once, not repeated as columns
    assert "norm" not in cols and "bias" not in cols and "scale" not in cols


def test_missing_tensors_are_dashes(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["gradcheck", "--pairwise", "gaussian", "--pairwise", "concatenation", "--dims", "1"]
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0
    cols = header(out)
    for row in table_rows(out):
        cells = dict(zip(cols, row.split(), strict=True))
        if cells["pairwise"] != "gaussian":
            assert all(v != "-" for k, v in cells.items() if k not in ("pool", "order"))
            continue
        for absent in ("θ.w", "θ.b", "φ.w", "φ.b", "w_f"):  # the Gaussian compares x itself
            assert cells[absent] == "-"
        for present in ("x", "g.w", "z.w", "γ"):
            assert float(cells[present]) < 1e-5


def test_columns_are_aligned(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "gradcheck", "--dims", "2")
    assert code == 0
    lines = out.splitlines()
    rule = next(i for i, line in enumerate(lines) if line and set(line) == {"-"})
    body = table_rows(out)
    # every error column ends at the same character position in header and rows
    head = lines[rule - 1]
    for label in ("x", "θ.w", "w_f", "β"):
        end = head.index(f" {label} ") + len(label) + 1
        for row in body:
            assert row[end] == " " and row[end - 1] != " ", (label, row)


def test_pairwise_and_dims_select(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "gradcheck", "--pairwise", "concatenation", "--dims", "2")
    assert code == 0
    rows = table_rows(out)
    assert len(rows) == DEFAULT_CASES_PER_VARIANT_AND_DIM
    for row in rows:
        fields = row.split()
        assert fields[0] == "concatenation"
        assert fields[1] == "5x6"
    assert [r.split()[2] for r in rows] == ["-", "2x2", "2x2"]
    assert [r.split()[3] for r in rows] == ["-", "after", "before"]
    assert "w_f" in header(out)


def test_pairwise_is_repeatable(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(
        capsys, "gradcheck", "--pairwise", "gaussian", "--pairwise", "dot_product", "--dims", "1"
    )
    assert code == 0
    assert sorted({r.split()[0] for r in table_rows(out)}) == ["dot_product", "gaussian"]
    assert "w_f" not in header(out)  # no concatenation row, so no w_f column


def test_unknown_pairwise_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "gradcheck", "--pairwise", "laplacian")
    assert code == 2
    assert "invalid choice" in err and "laplacian" in err


@pytest.mark.parametrize("mode", ["elementwise", "jacobian"])
def test_modes(capsys: pytest.CaptureFixture[str], mode: str) -> None:
    code, out, _ = run_cli(
        capsys, "gradcheck", "--pairwise", "embedded_gaussian", "--dims", "1", "--mode", mode
    )
    assert code == 0, out
    assert f"mode {mode}" in out


def test_full_grid(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "full.json"
    argv = ["gradcheck", "--full", "--pairwise", "dot_product", "--pairwise", "concatenation"]
    code, out, _ = run_cli(capsys, *argv, "--dims", "1", "--json", str(path))
    assert code == 0, out
    cols = header(out)
    assert {"norm", "bias", "scale"} <= set(cols)
    doc = json.loads(path.read_text(encoding="utf-8"))
    rows = doc["rows"]
    # 3 pools x 3 norms x 2 bias sets, x 2 scales for dot_product only (concat has none)
    assert len(rows) == 18 * 2 + 18
    assert {r["scale"] for r in rows if r["pairwise"] == "dot_product"} == {None, 0.5}
    assert {r["scale"] for r in rows if r["pairwise"] == "concatenation"} == {None}
    norms = {(r["norm"], r["training"]) for r in rows}
    assert norms == {("batchnorm", True), ("batchnorm", False), (None, True)}
    no_bias = [r for r in rows if not r["biases"]]
    assert no_bias and all(
        not any(k.endswith(".bias") and k != "bn.bias" for k in r["max_rel_err"]) for r in no_bias
    )
    assert all(r["passed"] for r in rows)
    # in the table, a config without biases shows '-' under the bias columns
    for line in table_rows(out):
        cells = dict(zip(cols, line.split(), strict=True))
        if cells["bias"] == "none":
            assert cells["θ.b"] == cells["g.b"] == cells["z.b"] == "-"
        if cells["norm"] == "none":
            assert cells["γ"] == cells["β"] == "-"


def test_iter_cases_refuses_no_scale_for_variants_without_one() -> None:
    for name in NAMES:
        variant = registry.get(name)
        scales = {c.cfg.scale for c in gc.iter_cases([name], [1], full=True)}
        assert scales == ({None, gc.FULL_SCALE} if variant.uses_scale else {None})


# ----------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    "bad",
    [
        ["--seed", "-1"],
        ["--rtol", "0"],
        ["--rtol", "-1"],
        ["--rtol", "nan"],
        ["--rtol", "inf"],
        ["--atol", "-1"],
        ["--atol=-1e-9"],  # argparse reads -1e-9 as an option unless joined with '='
        ["--atol", "nan"],
    ],
)
def test_bad_values_are_usage_errors(capsys: pytest.CaptureFixture[str], bad: list[str]) -> None:
    code, out, err = run_cli(capsys, "gradcheck", "--dims", "1", *bad)
    assert code == 2
    assert out == ""  # refused before any case ran: no table, no fake failure
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("nlref gradcheck: error: ") and bad[0].split("=")[0] in err


def test_the_table_says_what_its_cells_are(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "gradcheck", "--pairwise", "gaussian", "--dims", "1")
    assert code == 0
    assert "Each cell: the largest relative error" in out and "central differences" in out
    assert "Rounding noise" not in out  # the default tolerances are above the noise floor
    assert err == ""  # no progress bar where stderr is not a terminal
    assert max(len(line) for line in out.splitlines() if "Each cell" in line) <= 100


def test_tolerances_below_the_noise_floor_are_explained(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "tiny.json"
    argv = ["gradcheck", "--pairwise", "gaussian", "--dims", "1", "--json", str(path)]
    code, out, _ = run_cli(capsys, *argv, "--rtol", "1e-30", "--atol", "1e-30", "--quiet")
    assert code == 0
    rows = json.loads(path.read_text(encoding="utf-8"))["rows"]
    assert all(r["noise_used"] > 1e-30 for r in rows)  # every case leaned on the noise
    worst = max(r["noise_used"] for r in rows)
    text = " ".join(out.split())
    assert f"in {len(rows)} of {len(rows)} cases" in text
    assert f"largest {worst:.1e}; --atol 1e-30" in text
    assert "cannot be seen by finite differences" in text


def test_help_says_how_tiny_tolerances_are_treated(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "gradcheck", "--help")
    assert code == 0
    text = " ".join(out.split())
    assert "noise floor are accepted, not refused" in text and "--quiet" in text


# ----------------------------------------------------------------------- JSON


def test_json_rows(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    code, out, _ = run_cli(
        capsys, "gradcheck", "--dims", "1", "2", "--seed", "3", "--json", str(path)
    )
    assert code == 0
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["passed"] is True
    assert doc["seed"] == 3 and doc["backend"] == "numpy" and doc["mode"] == "directions"
    assert doc["nlref_version"] == nlref.__version__
    rows = doc["rows"]
    assert len(rows) == doc["cases"] == len(NAMES) * 2 * DEFAULT_CASES_PER_VARIANT_AND_DIM
    assert f"wrote {len(rows)} rows to {path}" in out
    for row in rows:
        cfg = nlref.NonLocalConfig(
            in_channels=row["in_channels"],
            inter_channels=row["inter_channels"],
            pairwise=row["pairwise"],
            sub_sample=None if row["sub_sample"] is None else tuple(row["sub_sample"]),
            pool_order=row["pool_order"] or "after_projection",
            norm=row["norm"],
            biases=tuple(row["biases"]),
            scale=row["scale"],
        )
        assert list(row["max_rel_err"]) == ["x", *nlref.trainable_names(cfg)]
        assert row["passed"] and row["status"] == "ok" and row["failed"] == []
        assert all(0 <= v < 1e-5 for v in row["max_rel_err"].values())
        assert row["dims"] == len(row["shape"]) - 2
    assert doc["worst_rel_err"] == max(max(r["max_rel_err"].values()) for r in rows)


def test_json_unwritable_path(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "no" / "such" / "dir" / "rows.json"
    code, _, err = run_cli(
        capsys, "gradcheck", "--pairwise", "gaussian", "--dims", "1", "--json", str(bad)
    )
    assert code == 2
    assert "cannot write --json" in err


# ----------------------------------------------------------------------- failures


def _scaled_dtheta(variant: Any) -> Any:
    def backward(dattention: Any, cache: Any) -> PairwiseGrads:
        grads = variant.backward(dattention, cache)
        return dataclasses.replace(grads, dtheta=grads.dtheta * 1.5)  # wrong on purpose

    return dataclasses.replace(variant, backward=backward)


def test_wrong_backward_fails_with_tensor_named(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    variant = registry.get("dot_product")
    monkeypatch.setitem(registry._REGISTRY, "dot_product", _scaled_dtheta(variant))
    path = tmp_path / "rows.json"
    code, out, _ = run_cli(capsys, "gradcheck", "--dims", "1", "--json", str(path))
    assert code == 1
    cols = header(out)
    for line in table_rows(out):
        cells = line.split()
        if cells[0] == "dot_product":
            assert "FAIL" in line and "θ.w" in line.split("FAIL", 1)[1]
            assert cells[cols.index("θ.w")].endswith("!")  # the failing cell is flagged
        else:
            assert cells[-1] == "ok"  # other variants are unaffected
    assert "FAIL dot_product S=7" in out  # the detailed report names the case ...
    assert "theta.weight" in out  # ... and the full tensor name
    assert "FAIL (3 of 12 cases failed)" in out
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["passed"] is False
    failed = [r for r in doc["rows"] if not r["passed"]]
    assert {r["pairwise"] for r in failed} == {"dot_product"}
    for r in failed:
        assert "theta.weight" in r["failed"] and "x" in r["failed"]
        assert "g.weight" not in r["failed"]  # only the θ path is wrong


def test_wrong_extra_gradient_fails_on_w_f(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    variant = registry.get("concatenation")

    def backward(dattention: Any, cache: Any) -> PairwiseGrads:
        grads = variant.backward(dattention, cache)
        dextra = {k: -v for k, v in grads.dextra.items()}  # sign error in dw_f
        return dataclasses.replace(grads, dextra=dextra)

    patched = dataclasses.replace(variant, backward=backward)
    monkeypatch.setitem(registry._REGISTRY, "concatenation", patched)
    code, out, _ = run_cli(capsys, "gradcheck", "--pairwise", "concatenation", "--dims", "2")
    assert code == 1
    for line in table_rows(out):
        assert line.split()[-2:] == ["FAIL", "w_f"]
    assert "concat.weight" in out


def test_exception_in_backward_is_an_error_row(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    variant = registry.get("gaussian")

    def backward(dattention: Any, cache: Any) -> PairwiseGrads:
        raise RuntimeError("boom")

    patched = dataclasses.replace(variant, backward=backward)
    monkeypatch.setitem(registry._REGISTRY, "gaussian", patched)
    code, out, _ = run_cli(capsys, "gradcheck", "--pairwise", "gaussian", "--dims", "1")
    assert code == 1
    assert all(line.split()[-1] == "ERROR" for line in table_rows(out))
    assert "RuntimeError: boom" in out


def test_degenerate_concatenation_draws_are_redrawn() -> None:
    """A dead ReLU makes the check vacuous; draw_case redraws until attention is alive."""
    xp = commands.load_backend("numpy")
    for seed in range(8):
        for case in gc.iter_cases(["concatenation"], [1, 2, 3]):
            params, x = gc.draw_case(case, xp, seed)
            _, cache = nlref.forward(x, params, case.cfg, training=case.training)
            active = (nlref.to_numpy(cache.attention) != 0).mean(axis=(1, 2))
            assert active.min() >= 0.1  # draw_smooth_input's min_active


# ----------------------------------------------------------------------- backends


def test_unknown_backend_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "gradcheck", "--backend", "jax")
    assert code == 2
    assert "--backend" in err and "invalid choice" in err


def test_unavailable_backend_exits_2_with_a_message(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_import = commands.importlib.import_module

    def fake_import(name: str, *args: Any) -> Any:
        if name == "array_api_strict":
            raise ImportError("No module named 'array_api_strict'")
        return real_import(name, *args)

    monkeypatch.setattr(commands.importlib, "import_module", fake_import)
    code, out, err = run_cli(capsys, "gradcheck", "--backend", "array_api_strict")
    assert code == 2
    assert "backend 'array_api_strict' is not available" in err
    assert "pip install array-api-strict" in err
    assert out == ""  # nothing was run


def test_cupy_without_cupy_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    code, _, err = run_cli(capsys, "gradcheck", "--backend", "cupy")
    assert code == 2
    assert "backend 'cupy' is not available" in err


def test_array_api_strict_backend(capsys: pytest.CaptureFixture[str]) -> None:
    require("array_api_strict")
    code, out, _ = run_cli(capsys, "gradcheck", "--backend", "array_api_strict", "--dims", "1")
    assert code == 0, out
    assert "backend array_api_strict" in out
    assert len(table_rows(out)) == len(NAMES) * DEFAULT_CASES_PER_VARIANT_AND_DIM


@pytest.mark.gpu
def test_cupy_backend(capsys: pytest.CaptureFixture[str]) -> None:
    require("cupy")
    code, out, _ = run_cli(capsys, "gradcheck", "--backend", "cupy", "--dims", "1", "2")
    assert code == 0, out


# ----------------------------------------------------------------------- entry points


def _script() -> str:
    script = Path(sys.executable).with_name("nlref" + (".exe" if os.name == "nt" else ""))
    assert script.exists(), f"the console script is not installed next to {sys.executable}"
    return str(script)


def test_console_script(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    argv = [_script(), "gradcheck", "--pairwise", "gaussian", "--dims", "1", "--json", str(path)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gaussian" in proc.stdout and "PASS" in proc.stdout
    assert len(json.loads(path.read_text(encoding="utf-8"))["rows"]) == 3

    proc = subprocess.run([_script()], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "usage: nlref" in proc.stdout


def test_python_dash_m() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "nlref", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"nlref {nlref.__version__}"
