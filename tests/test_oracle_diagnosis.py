"""The diagnosis: when a module differs, the conventions that make it match.

The three cases the oracle must name: a module with timm's scale checked as mmcv, a
pool-before module checked as pool-after, a frozen (eval-mode) BN checked in training
mode; then the other conventions (a bias the module does not add, a scale nlref has no
name for, the concatenation's 1/N′, the dot product vs the embedded Gaussian), and None
when nothing explains the difference.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from .conftest import require
from .test_oracle_support import torch_and_testing


def _mmcv_cnn() -> Any:
    require("mmcv")
    import mmcv.cnn

    return mmcv.cnn


def _x(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def test_timm_scale_checked_as_mmcv() -> None:
    torch, testing = torch_and_testing()

    class TimmScaled(_mmcv_cnn().NonLocal2d):  # mmcv's layout, timm's 1/√C
        def embedded_gaussian(self, theta_x: Any, phi_x: Any) -> Any:
            logits = torch.matmul(theta_x, phi_x) / self.in_channels**0.5
            return logits.softmax(dim=-1)

    module = testing.randomize(TimmScaled(64, sub_sample=True), 0)
    report = testing.compare(module, _x((2, 64, 5, 6)))
    assert not report.ok and report.first_divergence == "attention"
    assert report.diagnosis == (
        "diagnosis: scale: the module behaves as 1/√C = 0.125 (timm's convention), nlref used "
        "1/√C′ = 0.177 [compare(..., scale=0.125) matches]"
    )
    assert str(report).endswith(report.diagnosis)
    assert testing.compare(module, _x((2, 64, 5, 6)), scale=0.125).ok


def test_pool_before_checked_as_pool_after() -> None:
    torch, testing = torch_and_testing()
    require("pytorchvideo")
    from pytorchvideo.layers.nonlocal_net import create_nonlocal

    module = create_nonlocal(
        dim_in=8, dim_inner=4, pool_size=(1, 2, 2), instantiation="softmax",
        norm=torch.nn.BatchNorm3d,
    )  # fmt: skip
    module = testing.randomize(module, 1).eval()
    report = testing.compare(module, _x((2, 8, 3, 5, 6), 1), pool_order="after_projection")
    assert report.first_divergence == "g"
    assert report.diagnosis.startswith(
        "diagnosis: pool order: the module behaves as before_projection (pooling x before the "
        "φ and g projections; caffe2's and pytorchvideo's convention), nlref used "
        "after_projection"
    )
    assert report.diagnosis.endswith("[compare(..., pool_order='before_projection') matches]")


def test_bn_eval_checked_in_training_mode() -> None:
    _, testing = torch_and_testing()
    from .oracle_blocks import QKV_LAYOUT, QKVBlock

    module = testing.randomize(QKVBlock(8, 4, bn_eval=True), 2)  # a frozen BN (norm_eval)
    lay = QKV_LAYOUT.replace(config={"pairwise": "embedded_gaussian", "scale": 0.5})
    report = testing.compare(module, _x((2, 8, 5, 7), 2), layout=lay, training=True)
    assert not report.ok and report.first_divergence == "z"
    assert report.diagnosis == (
        "diagnosis: batch norm: the module behaves as in eval mode (running statistics, as a "
        "frozen BN: norm_eval=True), nlref used training mode (batch statistics) "
        "[compare(..., training=False) matches]"
    )


@pytest.mark.parametrize(
    ("kwargs", "overrides", "expected"),
    [
        (
            {"drop_bias": True},
            {"scale": 0.5},
            "diagnosis: z bias: the module behaves as having none (it holds one it does not "
            "add; mmcv's convention), nlref added it",
        ),
        ({"scale": 0.3}, {"scale": 0.5}, "scale: the module behaves as 0.3 (= 0.6 × nlref's)"),
        ({"scale": None}, {"scale": 0.5}, "scale: the module behaves as 1 (no scale;"),
        (
            {"softmax": False, "scale": None},
            {"scale": 0.5},
            "pairwise: the module behaves as dot_product (θᵢᵀφⱼ / N′, no softmax), nlref used "
            "embedded_gaussian (softmax of θᵢᵀφⱼ)",
        ),
        (
            {"pool": (2, 2)},
            {"scale": 0.5},
            "pool kernel: the module behaves as a max-pool of kernel (2, 2)",
        ),
        (
            {"pool": (2, 2), "scale": "in"},
            {"scale": 0.5},
            "pool kernel: the module behaves as a max-pool of kernel (2, 2) (paper's, "
            "alexhex7's and mmcv's convention), nlref used no pooling; and scale: the module "
            "behaves as 1/√C = 0.354",
        ),
    ],
    ids=["bias", "fitted-scale", "no-scale", "dot-product", "kernel", "kernel+scale"],
)
def test_other_conventions(kwargs: dict, overrides: dict, expected: str) -> None:
    _, testing = torch_and_testing()
    from .oracle_blocks import QKV_LAYOUT, QKVBlock

    module = testing.randomize(QKVBlock(8, 4, **kwargs), 3)
    lay = QKV_LAYOUT.replace(pool="pool") if "pool" in kwargs else QKV_LAYOUT
    if "pool" in kwargs:  # nlref reads the pool: make it check the block without one
        overrides = {**overrides, "sub_sample": None}
    report = testing.compare(
        module, _x((2, 8, 5, 7), 3), layout=lay, pairwise="embedded_gaussian",
        pool_order="before_projection", **overrides,
    )  # fmt: skip
    assert not report.ok
    assert report.diagnosis is not None and expected in report.diagnosis, report.diagnosis


def test_concatenation_without_its_division() -> None:
    torch, testing = torch_and_testing()

    class Undivided(_mmcv_cnn().NonLocal2d):  # forgets mmcv's / N′
        def concatenation(self, theta_x: Any, phi_x: Any) -> Any:
            h, w = theta_x.size(2), phi_x.size(3)
            pairs = torch.cat([theta_x.repeat(1, 1, 1, w), phi_x.repeat(1, 1, h, 1)], dim=1)
            weight = self.concat_project(pairs)
            n, _, h, w = weight.size()
            return weight.view(n, h, w)

    from .test_oracle_support import randomize_alive

    module = Undivided(8, mode="concatenation", sub_sample=True)
    x = _x((2, 8, 5, 7), 4)
    randomize_alive(module, x, True, 4)
    report = testing.compare(module, x)
    assert report.first_divergence == "attention"
    assert report.diagnosis == (
        "diagnosis: concatenation's 1/N′: the module behaves as not dividing by N′ = 6, nlref "
        "divides (as every implementation does)"
    )


def test_nothing_explains_a_bug() -> None:
    # softmax over the wrong axis is no convention: no diagnosis, and the report says FAIL
    torch, testing = torch_and_testing()

    class WrongAxis(_mmcv_cnn().NonLocal2d):
        def embedded_gaussian(self, theta_x: Any, phi_x: Any) -> Any:
            return (torch.matmul(theta_x, phi_x) / theta_x.shape[-1] ** 0.5).softmax(dim=1)

    report = testing.compare(testing.randomize(WrongAxis(8), 5), _x((2, 8, 5, 7), 5))
    assert not report.ok and report.diagnosis is None
    assert report.to_dict()["diagnosis"] is None
    assert testing.compare(testing.randomize(WrongAxis(8), 5), _x((2, 8, 5, 7)), diagnose=False)
    # and a module that matches has no diagnosis either
    assert (
        testing.compare(testing.randomize(_mmcv_cnn().NonLocal2d(8), 5), _x((2, 8, 5, 7))).diagnosis
        is None
    )
