"""Low precision: real modules run in float32, float16 and bfloat16 on the CPU pass against
nlref's float64 truth, each tensor within 16 times the error of an honest computation in
that precision (nlref in float32, nlref's step-by-step emulation in float16 / bfloat16);
logits off by 0.1 % fail in float32."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import nlref

from .conftest import require
from .test_oracle_support import timm_nonlocal_attn, torch_and_testing

DTYPES = ("float32", "float16", "bfloat16")


def _mmcv(mode: str) -> Any:
    require("mmcv")
    from mmcv.cnn import NonLocal2d

    return NonLocal2d(8, mode=mode, sub_sample=True, norm_cfg=dict(type="BN"))


def _pytorchvideo() -> Any:
    torch = require("torch")
    require("pytorchvideo")
    from pytorchvideo.layers.nonlocal_net import create_nonlocal

    return create_nonlocal(
        dim_in=8, dim_inner=4, pool_size=(1, 2, 2), instantiation="softmax",
        norm=torch.nn.BatchNorm3d,
    )  # fmt: skip


MODULES = {
    "mmcv-embedded_gaussian": (lambda: _mmcv("embedded_gaussian"), (2, 8, 5, 7)),
    "mmcv-dot_product": (lambda: _mmcv("dot_product"), (2, 8, 5, 7)),
    "timm": (lambda: timm_nonlocal_attn()(16), (2, 16, 5, 7)),
    "pytorchvideo": (_pytorchvideo, (2, 8, 3, 5, 6)),
}


@pytest.mark.parametrize("training", [True, False], ids=["bn_train", "bn_eval"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(MODULES))
def test_real_modules_pass_in_low_precision(name: str, dtype: str, training: bool) -> None:
    _, testing = torch_and_testing()
    make, shape = MODULES[name]
    seed = list(MODULES).index(name) * 10 + DTYPES.index(dtype)
    module = testing.randomize(make(), seed)
    report = testing.compare(
        module, np.random.default_rng(seed).standard_normal(shape), training=training,
        dtype=dtype, seed=seed,
    )  # fmt: skip
    assert report.ok, str(report)
    assert report.dtype == dtype and report.factor == testing.FACTOR[dtype]
    for row in report.rows:
        assert row.expected_err > 0 and row.allowed_err == report.factor * row.expected_err
        assert row.max_abs_err <= row.allowed_err
    # the errors are those of the precision: float32 ~1e-7, the 16-bit formats far larger
    z = report.row("z")
    relative = z.max_abs_err / z.magnitude
    assert {"float32": 1e-9 < relative < 1e-5, "float16": 1e-6 < relative < 1e-2}.get(
        dtype, 1e-5 < relative < 1e-1
    ), relative
    text = str(report)
    assert f"vs nlref, {dtype}" in text and "expected err  err/expected" in text
    assert f"PASS: {len(report.rows)} tensors match in {dtype}" in text


def _scaled_logits(factor: float) -> Any:
    torch, _ = torch_and_testing()
    require("mmcv")
    from mmcv.cnn import NonLocal2d

    class Scaled(NonLocal2d):
        def embedded_gaussian(self, theta_x: Any, phi_x: Any) -> Any:
            logits = torch.matmul(theta_x, phi_x) * factor / theta_x.shape[-1] ** 0.5
            return logits.softmax(dim=-1)

    return Scaled(8, sub_sample=True)


def test_logits_off_by_a_thousandth_fail_in_float32() -> None:
    _, testing = torch_and_testing()
    module = testing.randomize(_scaled_logits(1.001), 1)
    x = np.random.default_rng(1).standard_normal((2, 8, 5, 7))
    report = testing.compare(module, x, dtype="float32")
    assert not report.ok and report.first_divergence == "attention"
    assert report.row("attention").ratio > 100 * report.factor  # far beyond rounding
    assert "(= 1.001 × nlref's)" in report.diagnosis
    # the same module, correct, passes; and in float16 a 0.1 % scale is below rounding
    assert testing.compare(testing.randomize(_scaled_logits(1.0), 1), x, dtype="float32").ok
    assert testing.compare(module, x, dtype="float16").ok


def test_round_to_matches_torch() -> None:
    torch, _ = torch_and_testing()
    from nlref.testing.precision import round_to

    values = np.random.default_rng(0).standard_normal(10_000) * 10.0 ** np.arange(-5, 5).repeat(
        1000
    )
    values[:4] = [1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-11, 65520.0]  # ties, and float16 overflow
    for fmt in ("float16", "bfloat16", "float32"):
        want = torch.tensor(values, dtype=torch.float32).to(getattr(torch, fmt)).float().numpy()
        np.testing.assert_array_equal(round_to(values, fmt), want, err_msg=fmt)


@pytest.mark.parametrize("sub", ["full", "pool_after", "pool_before"])
@pytest.mark.parametrize("pairwise", nlref.pairwise.names())
def test_emulation_follows_nlrefs_steps(pairwise: str, sub: str) -> None:
    # without rounding (float32 storage is float32 arithmetic) the emulation is nlref in
    # float32: it runs the same steps, in the same order
    from nlref.testing import nonlocal_block

    from .grid import SUB_SAMPLES, config

    cfg = config(pairwise, 2, sub)
    params = nlref.init_params(cfg, rng=1, scheme="random")
    x = np.random.default_rng(1).standard_normal((2, 4, 5, 6))
    dz = np.random.default_rng(2).standard_normal(x.shape)
    p32 = {k: v.astype(np.float32) for k, v in params.items()}
    want = nonlocal_block.reference(cfg, p32, x.astype(np.float32), dz.astype(np.float32), True)
    got = nonlocal_block.emulate(cfg, params, x, dz, True, "float32")
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=2e-5, atol=2e-5, err_msg=name)
    assert SUB_SAMPLES[sub][0] == (cfg.sub_sample is not None)


def test_dtype_is_checked() -> None:
    _, testing = torch_and_testing()
    with pytest.raises(ValueError, match=r"dtype must be one of \('float64', 'float32'"):
        testing.compare(_mmcv("dot_product"), np.zeros((2, 8, 5, 7)), dtype="int8")
