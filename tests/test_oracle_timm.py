"""nlref against the real timm ``NonLocalAttn`` (timm 1.0.31, ``timm/layers/non_local_attn.py``).

timm's package imports torchvision, and the torchvision that installs beside torch 2.13.0
does not import; :func:`nlref.testing.load_timm_nonlocal_attn` loads timm's real
``non_local_attn.py`` without it (see its docstring). So this is timm's own code, not a
transcription: C′ = make_divisible(C/8, 8), logit scale C^-½ from the *input* channels, BN,
no pooling. Forward and every gradient match nlref to 1e-10, BN in training and eval mode.
"""

from __future__ import annotations

import numpy as np
import pytest

import nlref

from .test_oracle_support import check_report, timm_nonlocal_attn, torch_and_testing


@pytest.mark.parametrize("training", [True, False], ids=["bn_train", "bn_eval"])
@pytest.mark.parametrize("use_scale", [True, False], ids=["scale", "noscale"])
@pytest.mark.parametrize("channels", [16, 40])
def test_timm_matches_nlref(channels: int, use_scale: bool, training: bool) -> None:
    _, testing = torch_and_testing()
    cls = timm_nonlocal_attn()
    seed = channels + 2 * use_scale + training
    module = testing.randomize(cls(channels, use_scale=use_scale), seed).train(training)
    x = np.random.default_rng(seed).standard_normal((2, channels, 5, 3))
    report = testing.compare(module, x, seed=seed)
    assert report.cfg.inter_channels == nlref.presets.make_divisible(channels / 8, 8) == 8
    assert report.cfg.scale == (channels**-0.5 if use_scale else None)
    check_report(report)


def test_timm_inner_channels_rule_is_the_preset() -> None:
    cls = timm_nonlocal_attn()
    for c in (1, 3, 8, 24, 36, 64, 72, 100, 200, 256, 1000, 2048):
        assert cls(c).t.out_channels == nlref.preset("timm", c).inter_channels, c


def test_timm_scale_is_not_mmcvs() -> None:
    # at timm's default ratio C = 8C', so the mmcv/Caffe2 scale 1/sqrt(C') is sqrt(8) too
    # large: nlref catches it at z (timm exposes no attention)
    _, testing = torch_and_testing()
    module = testing.randomize(timm_nonlocal_attn()(64), 11).eval()
    x = np.random.default_rng(11).standard_normal((2, 64, 4, 4))
    report = testing.compare(module, x, scale=8**-0.5)
    assert not report.ok and report.first_divergence == "z"
