"""Golden vectors: the case grid, the files (no pickle), the manifest's tolerances, and
``--check`` catching tampering. The files are also checked against the independent
PyTorch reference (tests/torch_reference.py), so they are not only nlref agreeing with
itself."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

import nlref
from nlref import vectors

from .conftest import require


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("golden")
    vectors.write(out)
    return out


def test_case_grid_covers_every_variant_preset_and_dims() -> None:
    cases = list(vectors.iter_cases())
    assert len({c.name for c in cases}) == len(cases)
    for name in nlref.presets.names():
        p = nlref.presets.get(name)
        mine = [c for c in cases if c.preset == name]
        assert {c.cfg.pairwise for c in mine} == set(p.pairwise)
        assert {len(c.shape) - 2 for c in mine} == set(p.dims)
        if p.kernels:
            assert {c.cfg.sub_sample is None for c in mine} == {True, False}
        if p.norm is not None:
            assert {c.training for c in mine} == {True, False}
    dims = {len(c.shape) - 2 for c in cases}
    assert dims == {1, 2, 3}
    assert any(any(s % 2 for s in c.shape[2:]) for c in cases if len(c.shape) == 5)  # odd 3-D


def test_files_are_plain_npz_without_pickle(golden: Path) -> None:
    manifest = json.loads((golden / vectors.MANIFEST).read_text())
    assert manifest["format"] == vectors.FORMAT and manifest["version"] == vectors.VERSION
    assert len(manifest["cases"]) == len(list(vectors.iter_cases()))
    entry = next(
        c
        for c in manifest["cases"]
        if c["config"]["pairwise"] == "concatenation"
        and c["config"]["sub_sample"] is not None
        and c["training"]
    )
    path = golden / entry["file"]
    with zipfile.ZipFile(path) as zf:  # a zip of .npy files: any npz reader works
        assert all(n.endswith(".npy") for n in zf.namelist())
    with np.load(path, allow_pickle=False) as data:
        keys = set(data.files)
        assert all(data[k].dtype == np.float64 for k in keys)
    cfg = vectors._config_from_dict(entry["config"])
    expected = {"x", "dz", "z", "attention", "dx"}
    expected |= {f"param/{n}" for n in nlref.param_shapes(cfg)}
    expected |= {f"grad/{n}" for n in nlref.trainable_names(cfg)}
    if cfg.norm is not None:
        expected |= {"buffers_after/bn.running_mean", "buffers_after/bn.running_var"}
    assert keys == expected
    for key, tol in entry["tolerances"].items():
        assert tol["float64"]["atol"] <= tol["float32"]["atol"], key
        assert tol["float32"]["atol"] >= 10 * tol["float32"]["nlref_float32_max_abs_err"]


def test_check_passes_and_catches_tampering(golden: Path, tmp_path: Path) -> None:
    result = vectors.check(golden)
    assert result.ok and result.cases == len(list(vectors.iter_cases()))
    assert result.tensors > 5 * result.cases
    # change one number of one output, keep the hash: the recomputation catches it
    bad = tmp_path / "bad"
    bad.mkdir()
    manifest = json.loads((golden / vectors.MANIFEST).read_text())
    entry = manifest["cases"][0]
    manifest["cases"] = [entry]
    _, arrays = vectors.load_case(golden, entry["name"])
    arrays["grad/g.weight"][0, 0] += 1e-6
    with (bad / entry["file"]).open("wb") as fh:
        np.savez(fh, **arrays)
    entry["sha256"] = vectors._sha256(bad / entry["file"])
    (bad / vectors.MANIFEST).write_text(json.dumps(manifest))
    result = vectors.check(bad)
    assert not result.ok
    assert result.failures == [(entry["name"], result.failures[0][1])]
    assert "grad/g.weight" in result.failures[0][1]
    # and a changed file without a new hash
    entry["sha256"] = "0" * 64
    (bad / vectors.MANIFEST).write_text(json.dumps(manifest))
    assert any("SHA-256" in p for _, p in vectors.check(bad).failures)
    with pytest.raises(FileNotFoundError, match=r"manifest\.json not found"):
        vectors.check(tmp_path / "nowhere")


def test_float32_tolerances_accept_a_float32_implementation(golden: Path) -> None:
    # nlref's own float32 run passes the float32 tolerances with the documented margin
    manifest = json.loads((golden / vectors.MANIFEST).read_text())
    for entry in manifest["cases"][::7]:
        _, arrays = vectors.load_case(golden, entry["name"])
        cfg = vectors._config_from_dict(entry["config"])
        params = {k[6:]: v.astype(np.float32) for k, v in arrays.items() if k.startswith("param/")}
        got = vectors._compute(
            cfg,
            arrays["x"].astype(np.float32),
            params,
            arrays["dz"].astype(np.float32),
            entry["training"],
        )
        for key, tol in entry["tolerances"].items():
            t = tol["float32"]
            bound = t["atol"] + t["rtol"] * np.abs(arrays[key])
            assert np.all(np.abs(got[key] - arrays[key]) <= bound), (entry["name"], key)


def test_vectors_agree_with_the_independent_torch_reference(golden: Path) -> None:
    require("torch")
    from .torch_reference import torch_block

    manifest = json.loads((golden / vectors.MANIFEST).read_text())
    for entry in manifest["cases"][::11]:  # 19 cases: every preset, variant, pool order
        _, arrays = vectors.load_case(golden, entry["name"])
        cfg = vectors._config_from_dict(entry["config"])
        params = {k[6:]: v for k, v in arrays.items() if k.startswith("param/")}
        ref = torch_block(arrays["x"], params, cfg, training=entry["training"], dz=arrays["dz"])
        got = {"z": ref["z"], "attention": ref["attention"], "dx": ref["dx"]}
        got.update({f"grad/{k}": v for k, v in ref["grads"].items()})
        if entry["training"]:
            got.update({f"buffers_after/{k}": v for k, v in ref["buffers"].items()})
        assert set(got) == set(entry["tolerances"])
        for key, value in got.items():  # a float64 implementation meets the float64 tolerances
            tol = entry["tolerances"][key]["float64"]
            np.testing.assert_allclose(
                value,
                arrays[key],
                rtol=tol["rtol"],
                atol=tol["atol"],
                err_msg=f"{entry['name']} {key}",
            )


def test_filters_and_errors(tmp_path: Path) -> None:
    manifest = vectors.write(tmp_path, presets=["timm"])
    assert {c["preset"] for c in manifest["cases"]} == {"timm"}
    assert len(manifest["cases"]) == 4
    with pytest.raises(ValueError, match="no case matches"):
        vectors.write(tmp_path / "none", presets=["timm"], pairwise=["dot_product"])
    with pytest.raises(KeyError, match="no case 'x'"):
        vectors.load_case(tmp_path, "x")
