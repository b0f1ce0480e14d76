"""nlref against the real mmcv ``NonLocal1d/2d/3d`` (mmcv-lite 2.2.0), forward and backward.

Every mode × 1D/2D/3D × sub_sample × norm (none, BN in training mode, BN in eval mode),
with randomised non-degenerate weights, odd spatial sizes (max-pool floors), and a random
upstream gradient: the output, mmcv's attention, the values g, the BN running statistics,
every parameter gradient and dx match nlref to 1e-10 in float64.

mmcv's concatenation mode cannot run its backward: the ``/=`` in ``concatenation()``
modifies the output of the ReLU in place, which autograd needs. That is asserted here as a
finding (its forward still matches), together with the proof that the division is the only
defect: the same module with an out-of-place division matches nlref in every gradient.
"""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from .conftest import require
from .grid import NORMS
from .test_oracle_support import (
    TOL,
    check_report,
    concat_active_fraction,
    randomize_alive,
    torch_and_testing,
)

MODES = ("gaussian", "embedded_gaussian", "dot_product", "concatenation")
SHAPES = {1: (2, 6, 9), 2: (2, 6, 5, 7), 3: (2, 6, 3, 5, 6)}  # odd sizes: pooling floors
BN = {1: "BN1d", 2: "BN", 3: "BN3d"}  # mmcv's "BN" is BatchNorm2d, which refuses 1-D/3-D


def _cases() -> list[Any]:
    out = []
    for dims in SHAPES:
        for mode in MODES:
            for sub in (False, True):
                for norm in NORMS:
                    sub_id = "sub" if sub else "full"
                    case_id = f"{dims}d-{mode}-{sub_id}-{norm}"
                    out.append(pytest.param(dims, mode, sub, norm, id=case_id))
    return out


def _module(dims: int, mode: str, sub_sample: bool, norm: str, seed: int) -> Any:
    _, testing = torch_and_testing()
    mmcv_cnn = _mmcv_cnn()
    cls = {1: mmcv_cnn.NonLocal1d, 2: mmcv_cnn.NonLocal2d, 3: mmcv_cnn.NonLocal3d}[dims]
    norm_layer, training = NORMS[norm]  # the shared grid's BN train / BN eval / no norm
    with_bn = norm_layer is not None
    module = cls(
        6, mode=mode, sub_sample=sub_sample, norm_cfg=dict(type=BN[dims]) if with_bn else None
    )
    testing.randomize(module, seed)
    return module.train(training)


def _mmcv_cnn() -> Any:
    require("mmcv")
    import mmcv.cnn

    return mmcv.cnn


def _input(dims: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPES[dims])


def _concatenation_out_of_place(self: Any, theta_x: Any, phi_x: Any) -> Any:
    """mmcv's ``concatenation()`` with its one defect fixed: ``w = w / N′``, not ``w /= N′``."""
    import torch

    h, w = theta_x.size(2), phi_x.size(3)
    pairs = torch.cat([theta_x.repeat(1, 1, 1, w), phi_x.repeat(1, 1, h, 1)], dim=1)
    weight = self.concat_project(pairs)  # conv, then mmcv's in-place ReLU
    n, _, h, w = weight.size()
    weight = weight.view(n, h, w)
    return weight / weight.shape[-1]


@pytest.mark.parametrize(("dims", "mode", "sub_sample", "norm"), _cases())
def test_mmcv_matches_nlref(dims: int, mode: str, sub_sample: bool, norm: str) -> None:
    _, testing = torch_and_testing()
    seed = dims * 100 + MODES.index(mode) * 10 + sub_sample
    module = _module(dims, mode, sub_sample, norm, seed)
    x = _input(dims, seed)
    if mode == "concatenation":
        randomize_alive(module, x, NORMS[norm][1], seed)
    report = testing.compare(module, x, seed=seed)
    cfg = report.cfg
    # the config nlref read is the mmcv preset
    assert cfg.pairwise == mode and cfg.inter_channels == 3
    assert cfg.sub_sample == ({1: (2,), 2: (2, 2), 3: (1, 2, 2)}[dims] if sub_sample else None)
    assert cfg.biases == (
        ("theta", "phi", "g") if norm != "no_norm" else ("theta", "phi", "g", "z")
    )
    assert (cfg.scale is not None) == (mode == "embedded_gaussian")
    assert report.row("attention").source == f"{mode}() (output)"

    if mode != "concatenation":
        check_report(report)
        return

    # the finding: mmcv's concatenation backward raises; its forward is right
    assert not report.ok
    assert report.module_error_stage == "backward"
    assert "modified by an inplace operation" in report.module_error
    assert report.first_divergence is None  # nothing it computed is wrong
    for row in report.rows:
        if row.stage == "backward":
            assert row.status == "not captured", str(report)
        else:
            assert row.status == "ok" and row.max_abs_err <= TOL, str(report)
    assert "FAIL: the module's backward raised" in str(report)
    frac = concat_active_fraction(module, x, training=NORMS[norm][1])
    assert 0.05 < frac < 0.95, f"ReLU active fraction {frac}: a degenerate comparison"

    # ... and the in-place division is the whole defect: fixed, everything matches
    module.concatenation = types.MethodType(_concatenation_out_of_place, module)
    check_report(testing.compare(module, x, seed=seed))


def test_mmcv_use_scale_false_and_reduction() -> None:
    _, testing = torch_and_testing()
    mmcv_cnn = _mmcv_cnn()
    module = testing.randomize(mmcv_cnn.NonLocal2d(12, reduction=4, use_scale=False), 3)
    report = testing.compare(module, np.random.default_rng(3).standard_normal((2, 12, 4, 5)))
    assert report.cfg.scale is None and report.cfg.inter_channels == 3
    check_report(report)


def test_mmcv_bn_eps_and_momentum_are_read() -> None:
    _, testing = torch_and_testing()
    mmcv_cnn = _mmcv_cnn()
    norm_cfg = dict(type="BN", eps=1e-3, momentum=0.3)
    module = testing.randomize(mmcv_cnn.NonLocal2d(6, norm_cfg=norm_cfg, sub_sample=True), 5)
    report = testing.compare(module, _input(2, 5))
    assert (report.cfg.bn_eps, report.cfg.bn_momentum) == (1e-3, 0.3)
    check_report(report)  # includes the running statistics after one training step


def test_mmcv_wrong_convention_is_caught_at_the_attention() -> None:
    # reading mmcv with the timm scale (1/sqrt(C) instead of 1/sqrt(C')) must be caught,
    # and the first diverging tensor is the attention, before z and every gradient
    _, testing = torch_and_testing()
    mmcv_cnn = _mmcv_cnn()
    module = testing.randomize(mmcv_cnn.NonLocal2d(8, sub_sample=True), 9)
    x = np.random.default_rng(9).standard_normal((2, 8, 5, 4))
    report = testing.compare(module, x, scale=8**-0.5)
    assert not report.ok and report.module_error is None
    assert report.first_divergence == "attention"
    assert report.row("g").ok  # the values do not depend on the scale
    assert "first divergence at attention" in str(report)


def test_docs_five_lines_run() -> None:
    # the "check your module in five lines" snippets of docs/oracle.md and the README
    torch_and_testing()
    _mmcv_cnn()
    root = Path(__file__).resolve().parents[1]
    for doc in ("docs/oracle.md", "README.md"):
        text = (root / doc).read_text(encoding="utf-8")
        snippet = next(
            block
            for block in re.findall(r"```python\n(.*?)```", text, re.S)
            if "assert_matches" in block
        )
        assert len(snippet.strip().splitlines()) <= 5, doc
        namespace: dict = {}
        exec(compile(snippet, doc, "exec"), namespace)  # raises if the block does not match
