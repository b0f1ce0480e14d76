"""``check_model``: every Non-local block of a whole model, found and compared in one run.

The model mixes the real mmcv ``NonLocal2d``, the real timm ``NonLocalAttn`` and a
hand-written block described by a ``Layout``."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

from .conftest import require
from .test_oracle_support import timm_nonlocal_attn, torch_and_testing


def _model(*, broken: bool = False, unused: bool = False) -> tuple[Any, Any]:
    torch, testing = torch_and_testing()
    require("mmcv")
    from mmcv.cnn import NonLocal2d

    from .oracle_blocks import QKV_LAYOUT, QKVBlock

    timm_cls = timm_nonlocal_attn()

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.stage = torch.nn.Sequential(
                torch.nn.ReLU(), NonLocal2d(16, sub_sample=True, norm_cfg=dict(type="BN"))
            )
            self.attn = timm_cls(16)
            self.mine = QKVBlock(16, 8, scale="in" if broken else "inner")
            self.spare = QKVBlock(16, 8)
            self.head = torch.nn.Linear(16, 10)

        def forward(self, x: Any) -> Any:
            x = self.mine(self.attn(self.stage(self.stem(x))))
            x = x if unused else self.spare(x)
            return self.head(x.mean((2, 3)))

    layout = QKV_LAYOUT.replace(config={"pairwise": "embedded_gaussian", "scale": 8**-0.5})
    return testing.randomize(Net(), 0), layout


def _input() -> Any:
    torch, _ = torch_and_testing()
    return torch.tensor(np.random.default_rng(0).standard_normal((2, 3, 6, 7)), dtype=torch.float32)


def test_check_model_checks_every_block() -> None:
    torch, testing = torch_and_testing()
    model, layout = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = testing.check_model(model, _input(), layouts=[layout])
    assert report.ok, str(report)
    assert [(r.path, r.layout, r.module) for r in report.rows] == [
        ("stage.1", "mmcv", "NonLocal2d"),
        ("attn", "timm", "NonLocalAttn"),
        ("mine", "custom", "QKVBlock"),
        ("spare", "custom", "QKVBlock"),
    ]
    for row in report.rows:
        assert row.report.ok and row.report.input_shape == (2, 16, 6, 7)
        assert row.worst is row.report.worst and row.first_divergence is None
    assert report.block("attn").report.cfg.scale == 16**-0.5
    text = str(report)
    assert text.startswith("nlref oracle: 4 Non-local blocks of Net")
    assert re.search(r"\nstage\.1 +mmcv +NonLocal2d +float64 +ok ", text)
    assert text.endswith("PASS: all 4 blocks match nlref")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics unmoved
    with pytest.raises(KeyError, match="no block 'head'"):
        report.block("head")


def test_check_model_in_float16_and_a_failing_block() -> None:
    _, testing = torch_and_testing()
    model, layout = _model(broken=True, unused=True)
    report = testing.check_model(model, _input(), layouts=[layout], dtype="float16")
    assert not report.ok
    rows = {r.path: r for r in report.rows}
    assert rows["stage.1"].ok and rows["attn"].ok and rows["stage.1"].report.dtype == "float16"
    assert not rows["mine"].ok and rows["mine"].first_divergence == "z"
    assert rows["spare"].report is None and rows["spare"].error == "the model never called it"
    text = str(report)
    assert "mine: diagnosis: scale: the module behaves as 1/√C = 0.25" in text
    assert "spare: not compared: the model never called it" in text
    assert text.endswith("FAIL: 2 of 4 blocks do not match nlref")


def test_a_model_without_a_block_is_an_error() -> None:
    torch, testing = torch_and_testing()
    with pytest.raises(ValueError, match=r"no recognised Non-local block in Sequential"):
        testing.check_model(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1)), torch.zeros(1, 3, 4, 4))
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        testing.check_model(lambda x: x, torch.zeros(1))
