"""``nlref.preset``: each implementation's conventions, the rules that follow overrides, and
the docs table generated from the presets (it must be the one in docs/oracle.md)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

import nlref
from nlref import presets

DOCS = Path(__file__).resolve().parents[1] / "docs" / "oracle.md"
ALL4 = ("theta", "phi", "g", "z")


def test_docs_table_is_generated_from_the_presets() -> None:
    text = DOCS.read_text(encoding="utf-8")
    found = re.search(
        r"<!-- presets-table:start -->\n(.*?)\n<!-- presets-table:end -->", text, re.S
    )
    assert found, "docs/oracle.md lacks the presets-table markers"
    assert found.group(1).strip() == presets.table().strip(), (
        "docs/oracle.md's preset table is stale; regenerate it with "
        "python -c 'import nlref; print(nlref.presets.table())'"
    )


def test_table_lists_every_preset_and_evaluates_the_rules() -> None:
    table = presets.table()
    for name in presets.names():
        assert f"| `{name}` |" in table
    row = next(line for line in table.splitlines() if line.startswith("| `timm`"))
    assert "| 8 |" in row and "1/√64" in row  # C'=make_divisible(64/8, 8), alpha=1/sqrt(C)
    row = next(line for line in table.splitlines() if line.startswith("| `mmcv`"))
    assert "| 32 |" in row and "1/√32" in row


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        (
            "paper",
            {},
            dict(
                inter_channels=32,
                scale=None,
                sub_sample=None,
                pool_order="after_projection",
                biases=ALL4,
                norm="batchnorm",
            ),
        ),
        (
            "caffe2",
            {},
            dict(
                inter_channels=32,
                scale=32**-0.5,
                sub_sample=(1, 2, 2),
                pool_order="before_projection",
                biases=ALL4,
                norm="batchnorm",
            ),
        ),
        ("caffe2", {"pairwise": "dot_product"}, dict(scale=None, sub_sample=(1, 2, 2))),
        (
            "alexhex7",
            {},
            dict(
                inter_channels=32,
                scale=None,
                sub_sample=(1, 2, 2),
                pool_order="after_projection",
                biases=ALL4,
            ),
        ),
        ("alexhex7", {"dims": 1}, dict(sub_sample=(2,))),
        ("alexhex7", {"dims": 2, "sub_sample": False}, dict(sub_sample=None)),
        ("alexhex7", {"norm": None}, dict(norm=None, biases=ALL4)),
        (
            "mmcv",
            {},
            dict(
                inter_channels=32,
                scale=32**-0.5,
                sub_sample=None,
                norm=None,
                biases=ALL4,
                pool_order="after_projection",
            ),
        ),
        ("mmcv", {"norm": "batchnorm"}, dict(biases=("theta", "phi", "g"))),
        ("mmcv", {"pairwise": "gaussian"}, dict(scale=None)),
        ("mmcv", {"pairwise": "concatenation"}, dict(scale=None)),
        ("mmcv", {"sub_sample": True, "dims": 3}, dict(sub_sample=(1, 2, 2))),
        ("mmcv", {"inter_channels": 16}, dict(scale=0.25)),  # the scale follows C'
        (
            "timm",
            {},
            dict(inter_channels=8, scale=0.125, sub_sample=None, biases=ALL4, norm="batchnorm"),
        ),
        ("timm", {"inter_channels": 16}, dict(scale=0.125)),  # 1/sqrt(C), not C'
        (
            "pytorchvideo",
            {},
            dict(
                inter_channels=32,
                scale=32**-0.5,
                sub_sample=None,
                pool_order="before_projection",
                biases=ALL4,
            ),
        ),
        ("pytorchvideo", {"sub_sample": True}, dict(sub_sample=(1, 2, 2))),
        ("slowfast", {"pairwise": "dot_product"}, dict(scale=None)),
        ("mmcv", {"scale": None}, dict(scale=None)),  # use_scale=False
    ],
)
def test_preset_values(name: str, kwargs: dict, expected: dict) -> None:
    cfg = nlref.preset(name, 64, **kwargs)
    assert isinstance(cfg, nlref.NonLocalConfig) and cfg.in_channels == 64
    for field, value in expected.items():
        got = getattr(cfg, field)
        if isinstance(value, float):
            assert math.isclose(got, value, rel_tol=1e-15), (field, got, value)
        else:
            assert got == value, (field, got, value)


@pytest.mark.parametrize(
    ("c", "inner"), [(1, 8), (8, 8), (63, 8), (64, 8), (100, 16), (256, 32), (2048, 256)]
)
def test_timm_make_divisible(c: int, inner: int) -> None:
    assert presets.make_divisible(c / 8, 8) == inner
    assert nlref.preset("timm", c).inter_channels == inner


def test_half_rule_has_a_minimum_of_one() -> None:
    assert nlref.preset("alexhex7", 1, dims=1).inter_channels == 1
    assert nlref.preset("mmcv", 3).inter_channels == 1


@pytest.mark.parametrize("name", presets.names())
def test_every_preset_runs_every_variant_it_lists(name: str) -> None:
    p = presets.get(name)
    dims = p.default_dims or 2
    spatial = {1: (6,), 2: (4, 5), 3: (2, 4, 5)}[dims]
    for pairwise in p.pairwise:
        cfg = nlref.preset(name, 4, dims=dims, pairwise=pairwise)
        params = nlref.init_params(cfg, rng=0, scheme="random")
        x = np.random.default_rng(0).standard_normal((2, 4, *spatial))
        z, _ = nlref.forward(x, params, cfg, training=True)
        assert z.shape == x.shape and np.all(np.isfinite(z))


def test_errors_are_clear() -> None:
    with pytest.raises(ValueError, match=r"unknown preset 'keras'.*'paper'.*'pytorchvideo'"):
        nlref.preset("keras", 8)
    with pytest.raises(ValueError, match=r"preset 'timm'.*has pairwise \('embedded_gaussian',\)"):
        nlref.preset("timm", 8, pairwise="dot_product")
    with pytest.raises(ValueError, match=r"caffe2.*has pairwise"):
        nlref.preset("caffe2", 8, pairwise="gaussian")
    with pytest.raises(ValueError, match=r"supports 2-D inputs, got dims=3"):
        nlref.preset("timm", 8, dims=3)
    with pytest.raises(ValueError, match="no default pool kernel"):
        nlref.preset("timm", 8, sub_sample=True)
    with pytest.raises(ValueError, match="needs dims="):
        nlref.preset("mmcv", 8, sub_sample=True)
    with pytest.raises(TypeError, match=r"unexpected override\(s\) \['reduction'\]"):
        nlref.preset("mmcv", 8, reduction=4)
    with pytest.raises(ValueError, match="has 2 entries but dims=3"):
        nlref.preset("mmcv", 8, dims=3, sub_sample=(2, 2))
    with pytest.raises(ValueError, match="in_channels must be a positive int"):
        nlref.preset("paper", 0)
    with pytest.raises(ValueError, match=r"no θᵢᵀφⱼ"):  # NonLocalConfig's own check
        nlref.preset("mmcv", 8, pairwise="concatenation", scale=0.5)


def test_aliases_and_lookup() -> None:
    assert presets.get("SlowFast") is presets.get("pytorchvideo")
    assert presets.names() == ("paper", "caffe2", "alexhex7", "mmcv", "timm", "pytorchvideo")
    assert presets.get("mmcv").kernel(2) == (2, 2)


def test_native_variant_names_both_ways() -> None:
    # pytorchvideo's instantiation="softmax" is nlref's embedded Gaussian; its other names
    # are nlref's own
    video = presets.get("pytorchvideo")
    assert video.native_name("embedded_gaussian") == "softmax"
    assert video.native_name("dot_product") == "dot_product"
    assert [video.variant(video.native_name(v)) for v in video.pairwise] == list(video.pairwise)
    with pytest.raises(ValueError, match=r"has no variant 'gaussian'; it has \('softmax', "):
        video.variant("gaussian")
