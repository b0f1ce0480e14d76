"""The oracle speaks the Non-local family: layouts ``mmcv-gc``, ``timm-gc`` and ``dnl``,
``from_torch`` returning family configs, ``check_model`` on timm's ResNet-18 with 8
``GlobalContext`` or 8 ``NonLocalAttn`` blocks (real models, no weights downloaded),
float32, the diagnosis of the family's conventions, a GCNet block of your own, and
``nlref compare --layout mmcv-gc | timm-gc | dnl``.

The per-option matrix against the real modules is ``tests/test_family_real.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nlref.family import DNLConfig, GCNetConfig
from nlref.interop import LAYOUTS, Layout, mmseg_scale

from .conftest import require, run_cli
from .test_family_real import (
    TOL,
    check,
    mmcv_context_block,
    mmseg_dnl,
    nlref_testing,
    timm_global_context,
)


def _x(c: int, *spatial: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, c, *spatial))


# ─── Layouts, recognition, reading ────────────────────────────────────────────────────────


def test_family_layouts_are_rows_of_the_table() -> None:
    assert tuple(LAYOUTS)[4:] == ("mmcv-gc", "timm-gc", "dnl")
    assert [LAYOUTS[n].family for n in ("mmcv-gc", "timm-gc", "dnl")] == ["gcnet", "gcnet", "dnl"]
    paths = LAYOUTS["dnl"].paths(pooled=True, norm=True)
    assert paths["mask"] == "conv_mask" and paths["g"] == "g.0.conv"
    with pytest.raises(ValueError, match="a gcnet Layout needs layers="):
        Layout(family="gcnet")
    with pytest.raises(ValueError, match="a dnl Layout needs layers="):
        Layout(family="dnl", g="g", z="z")
    with pytest.raises(ValueError, match="family must be one of"):
        Layout(family="se", g="g", z="z")
    with pytest.raises(ValueError, match=r"unknown layout role\(s\) \['mask'\]"):
        Layout(g="g", z="z", pooled={"mask": "m.0"})  # a Non-local layout has no mask


def test_from_torch_reads_family_configs_and_key_maps() -> None:
    from nlref.interop import torch as interop

    module = mmcv_context_block()(16, 1 / 4, pooling_type="avg", fusion_types=("channel_mul",))
    cfg, params = interop.from_torch(module)
    assert cfg == GCNetConfig(16, 4, "avg", ("channel_mul",), ln_eps=1e-5)
    assert params["channel_mul.norm.weight"].shape == (4,)  # mmcv's (C′, 1, 1) flattened
    assert interop.key_map("mmcv-gc", cfg)["channel_mul.fc2.weight"] == "channel_mul_conv.3.weight"
    cfg, _ = interop.from_torch(module, ln_eps=1e-6)  # overrides win
    assert cfg.ln_eps == 1e-6
    with pytest.raises(TypeError, match="unexpected config override"):
        interop.from_torch(module, pairwise="dot_product")
    with pytest.raises(TypeError, match="whose config is a GCNetConfig; got a DNLConfig"):
        interop.key_map("timm-gc", DNLConfig(8))
    with pytest.raises(ValueError, match="from_state_dict reads Non-local blocks"):
        interop.from_state_dict(module.state_dict(), "mmcv-gc")
    with pytest.raises(ValueError, match="to_state_dict writes Non-local blocks"):
        interop.to_state_dict(cfg, params, "mmcv-gc", dims=2)


def test_dnl_is_recognised_before_its_parent_class() -> None:
    from mmcv.cnn import NonLocal2d

    from nlref.interop import torch as interop

    dnl = mmseg_dnl()(8, temperature=0.05)
    assert interop.module_layout(dnl).name == "dnl"
    assert interop.module_layout(NonLocal2d(8)).name == "mmcv"
    cfg, params = interop.from_torch(dnl)
    assert cfg == DNLConfig(8, 4, **mmseg_scale(4, True, 0.05), norm=None)
    assert list(params)[6:8] == ["mask.weight", "mask.bias"]  # after θ, φ, g


def test_mmseg_scale_rounds_like_mmsegmentation() -> None:
    torch = require("torch")
    for c in range(1, 1025):  # mmsegmentation's float32 tensor arithmetic
        root = float(torch.tensor(c, dtype=torch.float) ** torch.tensor(0.5))
        assert mmseg_scale(c, True, 0.05)["scale"] == 1.0 / root, c
    kwargs = mmseg_scale(256, True, 0.05)
    assert kwargs["temperature"] == float(torch.tensor(0.05)) != 0.05
    assert mmseg_scale(256, False, 0.05)["scale"] is None
    assert DNLConfig(512, **kwargs).effective_scale == pytest.approx(1.25, rel=1e-7)


def test_a_gcnet_block_of_your_own() -> None:
    """A hand-written global context block, checked with a Layout and no other code."""
    torch = require("torch")
    nn = torch.nn

    class MyGC(nn.Module):
        def __init__(self, c: int, inner: int) -> None:
            super().__init__()
            self.key = nn.Conv2d(c, 1, 1)
            self.squeeze = nn.Conv2d(c, inner, 1)
            self.ln = nn.LayerNorm(inner, eps=1e-5)
            self.act = nn.ReLU(inplace=True)
            self.excite = nn.Conv2d(inner, c, 1)

        def forward(self, x: Any) -> Any:
            weights = torch.softmax(self.key(x).flatten(2), dim=-1)  # (B, 1, N)
            context = (x.flatten(2) * weights).sum(-1)[..., None, None]  # (B, C, 1, 1)
            t = self.squeeze(context).flatten(1)
            t = self.excite(self.act(self.ln(t))[..., None, None])
            return x + t

    layout = Layout(
        family="gcnet",
        layers={
            "mask": "key",
            "channel_add.fc1": "squeeze",
            "channel_add.norm": "ln",
            "channel_add.relu": "act",
            "channel_add.fc2": "excite",
        },
    )
    report = check(MyGC(12, 3), _x(12, 5, 4), layout=layout)
    assert report.layout == "custom" and report.cfg == GCNetConfig(12, 3, "att", ("channel_add",))
    sigmoid = layout.replace(layers={**dict(layout.layers), "channel_add.relu": "key"})
    with pytest.raises(ValueError, match="layer 'key' is Conv2d"):
        nlref_testing().compare(MyGC(12, 3), _x(12, 5, 4), layout=sigmoid)


# ─── The oracle: precision, diagnosis ─────────────────────────────────────────────────────


def test_float32_compares_and_float16_is_refused() -> None:
    """float32: each tensor within 16 times nlref's own float32 error; the gradients that
    are zero by construction (b_k, b_m, θ's and φ's biases) are judged against their
    weight's gradient, a sum of the same terms. C′ = 4: a layer norm over C′ = 2 values is
    ±1 whatever its input, and its gradient is rounding noise."""
    testing = nlref_testing()
    modules = (
        timm_global_context()(32, fuse_add=True, rd_channels=4),
        mmcv_context_block()(32, 1 / 8, fusion_types=("channel_add", "channel_mul")),
        mmseg_dnl()(8, temperature=0.05, norm_cfg=dict(type="BN")),
    )
    for module in modules:
        c = 8 if hasattr(module, "conv_out") else 32
        for training in (True, False):
            report = testing.compare(
                module, _x(c, 5, 4), randomize=True, dtype="float32", training=training
            )
            assert report.ok and report.dtype == "float32", str(report)
        with pytest.raises(ValueError, match="pass dtype='float32' or 'float64'"):
            testing.compare(module, _x(c, 5, 4), dtype="float16")


def test_diagnosis_names_timms_layer_norm_epsilon() -> None:
    module = timm_global_context()(16, fuse_add=True, fuse_scale=False)
    report = nlref_testing().compare(module, _x(16, 5, 4), randomize=True, ln_eps=1e-5)
    assert not report.ok and report.first_divergence == "z"
    assert report.diagnosis == (
        "diagnosis: layer norm ε: the module behaves as 1e-06 (LayerNorm2d's: timm's), nlref "
        "used 1e-05 (nn.LayerNorm's default: mmcv's) [compare(..., ln_eps=1e-06) matches]"
    )


# ─── Whole models: timm's ResNet-18 ───────────────────────────────────────────────────────


def resnet18(attn_layer: str) -> Any:
    """timm's ``resnet18`` with ``attn_layer`` in every BasicBlock, no weights downloaded,
    in float64 with random non-degenerate weights (timm zero-initialises each block's last
    BN, which would feed its attention block zeros)."""
    testing = nlref_testing()
    timm_global_context()  # skips or fails like the other timm tests
    resnet = testing.load_timm("timm.models.resnet")
    model = resnet.resnet18(pretrained=False, block_args=dict(attn_layer=attn_layer))
    return testing.randomize(model.double(), 0)


@pytest.mark.parametrize(
    ("attn_layer", "cls", "layout"),
    [("gc", "GlobalContext", "timm-gc"), ("nl", "NonLocalAttn", "timm")],
)
def test_check_model_on_timm_resnet18(attn_layer: str, cls: str, layout: str) -> None:
    torch = require("torch")
    model = resnet18(attn_layer)
    x = torch.tensor(np.random.default_rng(0).standard_normal((1, 3, 64, 64)))
    report = nlref_testing().check_model(model, x)
    assert report.ok, str(report)
    blocks = [f"layer{i}.{j}.se" for i in range(1, 5) for j in range(2)]
    assert [(r.path, r.module, r.layout) for r in report.rows] == [(b, cls, layout) for b in blocks]
    for row in report.rows:
        rows = row.report.rows
        assert {r.stage for r in rows} >= {"forward", "backward"}
        assert all(r.compared for r in rows) and rows[-1].name == "dx"
        assert max(r.max_abs_err for r in rows) <= TOL
        assert set(row.report.vacuous) <= {"mask.bias"}  # zero by construction (a softmax)
    shapes = [row.report.input_shape for row in report.rows]
    assert shapes[0] == (1, 64, 16, 16) and shapes[-1] == (1, 512, 2, 2)
    kind = "blocks" if attn_layer == "gc" else "Non-local blocks"
    assert str(report).startswith(f"nlref oracle: 8 {kind} of ResNet")


def test_the_oracle_docs_family_snippets_run() -> None:
    """docs/oracle.md's ContextBlock and ResNet-18 examples run as written, and pass."""
    mmcv_context_block(), timm_global_context()
    text = (Path(__file__).resolve().parents[1] / "docs" / "oracle.md").read_text()
    section = text[text.index("## The Non-local family") : text.index("## Low precision")]
    snippets = [b for b in re.findall(r"```python\n(.*?)```", section, re.S) if "testing." in b]
    assert len(snippets) == 2
    for snippet in snippets:
        namespace: dict[str, Any] = {}
        exec(compile(snippet.replace("print(report)", "assert report.ok, report"),
                     "docs/oracle.md", "exec"), namespace)  # fmt: skip


# ─── The command line ─────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("argv", "module", "rows"),
    [
        (("--layout", "mmcv-gc", "--fusion", "both"), "ContextBlock", 18),
        (("--layout", "timm-gc", "--pooling", "avg", "--fusion", "add"), "GlobalContext", 8),
        (("--layout", "dnl", "--temperature", "0.5", "--eval"), "DisentangledNonLocal2d", 15),
    ],
    ids=["mmcv-gc", "timm-gc", "dnl"],
)
def test_compare_family_from_the_command_line(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], module: str, rows: int
) -> None:
    mmcv_context_block(), timm_global_context(), mmseg_dnl()
    code, out, _ = run_cli(capsys, "compare", *argv)
    assert code == 0, out
    assert f"nlref oracle: {module} (layout {argv[1]}, a randomised copy)" not in out
    assert f"nlref oracle: {module} (layout {argv[1]})" in out
    assert out.rstrip().splitlines()[-1].startswith(f"PASS: {rows} tensors match")
    assert "vacuous" not in out


def test_compare_dnl_sub_sample_reports_the_module_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    mmseg_dnl()
    path = tmp_path / "report.json"
    code, out, _ = run_cli(
        capsys, "compare", "--layout", "dnl", "--sub-sample", "--json", str(path)
    )
    assert code == 1
    assert re.search(r"forward +g +g \(output\) .* ok", out)
    assert "module error in forward: RuntimeError: Expected size for first two dimensions" in out
    doc = json.loads(path.read_text())
    assert doc["module_error_stage"] == "forward" and doc["config"]["sub_sample"] == [2, 2]
    assert doc["config"]["temperature"] == mmseg_scale(4, True, 0.05)["temperature"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ("--layout", "timm-gc", "--temperature", "1"),
            "--temperature is an option of --layout dnl",
        ),
        (("--layout", "dnl", "--fusion", "add"), "--fusion is an option of --layout mmcv-gc"),
        (("--layout", "mmcv", "--pooling", "avg"), "--pooling is an option of --layout mmcv-gc"),
        (("--layout", "mmcv-gc", "--sub-sample"), "(GCNet) has no --sub-sample and no --norm"),
        (("--layout", "dnl", "--scale", "0.5"), "--scale none turns it off"),
        (("--layout", "dnl", "--dtype", "float16"), "use --dtype float32 or float64"),
        (("--layout", "dnl", "--pairwise", "dot_product"), "--layout dnl has no --pairwise"),
    ],
)
def test_compare_family_usage_errors(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str
) -> None:
    mmcv_context_block(), timm_global_context(), mmseg_dnl()
    code, _, err = run_cli(capsys, "compare", *argv)
    assert code == 2 and message in err, err
