"""Golden vectors for inference engines: the ONNX backend-test layout, run in ONNX Runtime.

Every case of the mmcv preset (the four variants, 1-D to 3-D, pooling on and off, BN in
training and eval mode and no norm) and of pytorchvideo (the pool before the
projections): ONNX Runtime's CPU output of each ``model.onnx`` on ``input_0.pb``
reproduces ``output_0.pb`` within the manifest's float32 tolerance. onnx and onnxruntime
are in the test extra: missing, these tests fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest

from nlref import vectors
from nlref.interop.onnx import OPSET

PRESETS = ["mmcv", "pytorchvideo"]


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx")
    vectors.write(out, presets=PRESETS, format="onnx", progress=False)
    return out


def test_onnx_runtime_reproduces_every_case(golden: Path) -> None:
    manifest = json.loads((golden / vectors.MANIFEST).read_text())
    assert manifest["storage"] == "onnx" and manifest["dtype"] == "float32"
    cases = manifest["cases"]
    assert len(cases) == len(list(vectors.iter_cases(PRESETS)))
    variants = set()
    worst = 0.0
    for case in cases:
        folder = golden / case["file"]
        assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == [
            "model.onnx", "test_data_set_0/input_0.pb", "test_data_set_0/output_0.pb",
        ]  # fmt: skip
        model = onnx.load(str(folder / "model.onnx"))
        onnx.checker.check_model(model)
        assert model.opset_import[0].version == OPSET >= 17
        ops = {node.op_type for node in model.graph.node}
        assert ops <= {"Conv", "MaxPool", "Reshape", "Transpose", "MatMul", "Mul", "Softmax",
                       "Relu", "Add", "Split", "BatchNormalization", "ReduceMean", "Sub",
                       "Sqrt", "Div", "Identity"}  # fmt: skip
        x, want = (
            onnx.numpy_helper.to_array(onnx.load_tensor(str(folder / "test_data_set_0" / f)))
            for f in ("input_0.pb", "output_0.pb")
        )
        assert x.dtype == want.dtype == np.float32 and list(x.shape) == case["input_shape"]
        session = onnxruntime.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        (got,) = session.run(None, {"x": x})
        tol = case["tolerances"]["z"]["float32"]
        bound = tol["atol"] + tol["rtol"] * np.abs(want.astype(np.float64))
        ratio = float(np.max(np.abs(got.astype(np.float64) - want) / bound))
        assert ratio <= 1.0, (case["name"], ratio)
        worst = max(worst, ratio)
        variants.add((case["config"]["pairwise"], case["config"]["pool_order"], case["training"]))
    assert len(variants) == 4 * 2 + 2 * 2  # every variant, both pool orders, both BN modes
    assert worst > 0  # ONNX Runtime computes; it does not read the answer


def test_check_verifies_onnx_folders(golden: Path, tmp_path: Path) -> None:
    result = vectors.check(golden)
    assert result.ok and result.storage == "onnx" and result.tensors == result.cases
    # a changed output: both its hash and nlref's recomputation catch it
    bad = tmp_path / "bad"
    manifest = json.loads((golden / vectors.MANIFEST).read_text())
    entry = manifest["cases"][5]
    manifest["cases"] = [entry]
    (bad / entry["file"]).mkdir(parents=True)
    for rel in entry["files"]:
        target = bad / entry["file"] / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((golden / entry["file"] / rel).read_bytes())
    out = bad / entry["file"] / "test_data_set_0" / "output_0.pb"
    z = onnx.numpy_helper.to_array(onnx.load_tensor(str(out))).copy()
    z.flat[0] += 1e-2 * max(1.0, abs(float(z.flat[0])))
    out.write_bytes(onnx.numpy_helper.from_array(z, "z").SerializeToString())
    (bad / vectors.MANIFEST).write_text(json.dumps(manifest))
    problems = [p for _, p in vectors.check(bad).failures]
    assert any("SHA-256 of test_data_set_0/output_0.pb" in p for p in problems)
    assert any(p.startswith("z: max |nlref - file|") for p in problems)


def test_out_refuses_a_directory_with_vectors_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "golden"
    vectors.write(out, presets=["timm"], progress=False)
    (out / "NOTES.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"already holds golden vectors .*--force"):
        vectors.write(out, presets=["caffe2"], progress=False)
    with pytest.raises(FileExistsError):
        vectors.write(out, presets=["timm"], format="onnx", progress=False)
    manifest = vectors.write(out, presets=["caffe2"], format="onnx", force=True, progress=False)
    names = {c["name"] for c in manifest["cases"]}
    entries = {p.name for p in out.iterdir()}
    assert entries == names | {vectors.MANIFEST, "NOTES.txt"}  # no stale timm .npz left
    vectors.write(out, presets=["timm"], force=True, progress=False)
    assert {p.name for p in out.iterdir()} == {
        f"{c.name}.npz" for c in vectors.iter_cases(["timm"])
    } | {vectors.MANIFEST, "NOTES.txt"}
    assert vectors.check(out).ok
    with pytest.raises(ValueError, match="format must be one of"):
        vectors.write(tmp_path / "x", format="tflite")


def test_the_docs_onnx_runtime_snippet_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "vectors.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "ort." in b)
    vectors.write(tmp_path / "golden-onnx", presets=["timm"], format="onnx", progress=False)
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "docs/vectors.md", "exec"), {})  # asserts every case
