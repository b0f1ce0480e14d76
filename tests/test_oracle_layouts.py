"""Declarative layouts: a hand-written block is checked with a ``Layout`` and no other code;
what neither the weights nor the declared attributes tell is asked for, never guessed
(nothing in nlref reads a module's source code)."""

from __future__ import annotations

import importlib
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import nlref
from nlref.interop import LAYOUTS, Layout, get_layout, register_layout, unregister_layout

from .test_oracle_support import check_report, torch_and_testing

SHAPE = (2, 8, 5, 7)


def _blocks() -> Any:
    torch_and_testing()
    from . import oracle_blocks

    return oracle_blocks


def _x(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def test_a_hand_written_block_is_checked_with_a_layout() -> None:
    _, testing = torch_and_testing()
    blocks = _blocks()
    module = testing.randomize(blocks.QKVBlock(8, 4), 0)
    layout = Layout(theta="query_conv", phi="key_conv", g="value_conv", z="out_conv", bn="out_bn")
    report = testing.compare(module, _x(), layout=layout, pairwise="embedded_gaussian", scale=0.5)
    check_report(report)
    assert report.layout == "custom" and report.cfg.biases == ("theta", "phi", "g", "z")
    assert report.row("g").source == "value_conv (output)"
    assert report.row("theta.weight").source == "query_conv.weight.grad"
    # pooled before the projections, declared in the layout: the kernel is read off the pool
    pooled = testing.randomize(blocks.QKVBlock(8, 4, pool=(2, 2)), 1)
    lay = layout.replace(pool="pool", pool_order="before_projection")
    report = testing.compare(pooled, _x(1), layout=lay, pairwise="embedded_gaussian", scale=0.5)
    check_report(report)
    assert report.cfg.sub_sample == (2, 2) and report.cfg.pool_order == "before_projection"


def test_what_the_layout_cannot_tell_is_asked_for() -> None:
    _, testing = torch_and_testing()
    blocks = _blocks()
    module = blocks.QKVBlock(8, 4, pool=(2, 2))
    lay = blocks.QKV_LAYOUT
    with pytest.raises(ValueError, match=r"cannot tell the variant apart.*pass pairwise="):
        testing.compare(module, _x(), layout=lay)
    with pytest.raises(ValueError, match=r"has no preset.*logit scale.*pass scale="):
        testing.compare(module, _x(), layout=lay, pairwise="embedded_gaussian")
    with pytest.raises(ValueError, match=r"declares no pool order; pass pool_order="):
        testing.compare(
            module, _x(), layout=lay.replace(pool="pool"), pairwise="dot_product", scale=None
        )
    # an unknown hand-written block: the TypeError says how to describe it
    with pytest.raises(TypeError, match=r"describe your own with layout=.*Layout\(theta="):
        testing.compare(module, _x())
    with pytest.raises(ValueError, match=r"Layout needs z="):
        Layout(g="value_conv")


def test_layout_config_gives_the_conventions_once() -> None:
    _, testing = torch_and_testing()
    blocks = _blocks()
    module = testing.randomize(blocks.QKVBlock(8, 4, scale=None), 2)
    lay = blocks.QKV_LAYOUT.replace(config={"pairwise": "embedded_gaussian", "scale": None})
    check_report(testing.compare(module, _x(2), layout=lay))


def test_linear_layout_on_channels_last_tokens() -> None:
    _, testing = torch_and_testing()
    blocks = _blocks()
    module = testing.randomize(blocks.TokenBlock(8, 4), 3)
    report = testing.compare(module, _x(3), layout=blocks.TOKEN_LAYOUT)
    assert report.ok, str(report)
    assert report.cfg.norm is None and report.row("g").ok  # nn.Linear output, channels last
    cfg, params = nlref.interop.torch.from_torch(module, layout=blocks.TOKEN_LAYOUT)
    sd = nlref.interop.torch.to_state_dict(cfg, params, blocks.TOKEN_LAYOUT)
    assert sd["q.weight"].shape == (4, 8)  # no kernel dims on a linear layout
    module.load_state_dict(sd)


def test_every_call_takes_a_name_or_a_layout() -> None:
    _, testing = torch_and_testing()
    from nlref.interop import torch as interop

    blocks = _blocks()
    module = testing.randomize(blocks.QKVBlock(8, 4), 4).double()
    lay = blocks.QKV_LAYOUT.replace(config={"pairwise": "embedded_gaussian", "scale": 0.5})
    cfg, params = interop.from_torch(module, layout=lay)
    assert interop.key_map(lay, cfg)["g.weight"] == "value_conv.weight"
    sd = interop.to_state_dict(cfg, params, lay, dims=2)
    cfg2, params2 = interop.from_state_dict(sd, lay)
    assert cfg2 == cfg and all(np.array_equal(params[k], params2[k]) for k in params)
    registered = register_layout("qkv-test", lay)
    try:
        assert get_layout("qkv-test") is registered and registered.name == "qkv-test"
        assert interop.detect_layout(sd) == "qkv-test"
        assert interop.module_layout(module).name == "qkv-test"
        report = testing.assert_matches(module, _x(4), layout="qkv-test")
        assert report.layout == "qkv-test"
        with pytest.raises(ValueError, match="already registered"):
            register_layout("qkv-test", lay.replace(bn=None))
        with pytest.raises(ValueError, match="built-in layout"):
            register_layout("mmcv", lay)
    finally:
        unregister_layout("qkv-test")
    assert tuple(LAYOUTS)[:4] == ("mmcv", "timm", "pytorchvideo", "alexhex7")
    assert tuple(LAYOUTS)[4:] == ("mmcv-gc", "timm-gc", "dnl")
    with pytest.raises(ValueError, match=r"unknown layout 'qkv-test'"):
        get_layout("qkv-test")


def test_the_built_in_layouts_are_one_table() -> None:
    torch_and_testing()
    from nlref.interop import torch as interop

    mmcv = LAYOUTS["mmcv"]
    assert mmcv.paths(pooled=True, norm=True)["g"] == "g.0.conv"
    assert LAYOUTS["alexhex7"].paths(pooled=False, norm=False)["z"] == "W"
    assert LAYOUTS["pytorchvideo"].pool_order == "before_projection"
    cfg = nlref.preset("alexhex7", 8, dims=2, norm=None, pairwise="concatenation")
    assert interop.key_map("alexhex7", cfg) == interop.key_map(LAYOUTS["alexhex7"], cfg)


def _alexhex7(name: str) -> Any:
    torch_and_testing()
    return importlib.import_module(f"tests.test_oracle_alexhex7_lib.non_local_{name}")


def test_the_variant_is_never_guessed_from_source_text() -> None:
    # an AlexHex7-layout class from an unknown file: its variant cannot be read, so compare
    # asks, whatever its forward's text says
    torch, testing = torch_and_testing()
    base = _alexhex7("dot_product").NONLocalBlock2D

    class CommentedDot(base):  # a correct dot product whose comment mentions softmax
        def forward(self, x: Any, return_nl_map: bool = False) -> Any:
            # unlike the embedded Gaussian, no softmax here
            return super().forward(x, return_nl_map)

    module = testing.randomize(CommentedDot(8), 5)
    with pytest.raises(ValueError, match="pass pairwise="):
        testing.compare(module, _x(5))
    check_report(testing.compare(module, _x(5), pairwise="dot_product"))

    eg = _alexhex7("embedded_gaussian").NONLocalBlock2D

    class NoSoftmax(eg):  # meant as an embedded Gaussian, softmax replaced by / N
        def forward(self, x: Any, return_nl_map: bool = False) -> Any:
            b = x.size(0)
            g_x = self.g(x).view(b, self.inter_channels, -1).permute(0, 2, 1)
            t = self.theta(x).view(b, self.inter_channels, -1).permute(0, 2, 1)
            p = self.phi(x).view(b, self.inter_channels, -1)
            f = torch.matmul(t, p)
            f = f / f.size(-1)
            y = torch.matmul(f, g_x).permute(0, 2, 1).reshape(b, -1, *x.shape[2:])
            z = self.W(y) + x
            return (z, f) if return_nl_map else z

    module = testing.randomize(NoSoftmax(8), 6)
    report = testing.compare(module, _x(6), pairwise="embedded_gaussian")
    assert not report.ok and report.first_divergence == "attention"
    assert "module behaves as dot_product" in report.diagnosis
    # and nlref's sources hold no reading of a module's source code
    root = Path(nlref.__file__).parent
    for path in root.rglob("*.py"):
        assert not re.search(r"getsource|getsourcelines|findsource", path.read_text()), path


def test_rows_that_cannot_be_captured_say_so() -> None:
    # the key pool runs after the value projection but outside the layout's g: the g probe
    # sees unpooled values, so the g row is "not captured" and the first divergence is
    # a tensor that truly differs (here none: the module is right)
    _, testing = torch_and_testing()
    blocks = _blocks()
    module = testing.randomize(blocks.QKVBlock(8, 4, pool=(2, 2), pool_after=True), 7)
    lay = blocks.QKV_LAYOUT.replace(pool="pool", pool_order="after_projection", values="value_conv")
    report = testing.compare(module, _x(7), layout=lay, pairwise="embedded_gaussian", scale=0.5)
    g = report.row("g")
    assert g.status == "not captured" and "probe saw shape (2, 4, 5, 7)" in g.detail
    assert report.ok and report.first_divergence is None, str(report)
    assert "not run" not in str(report)
    # without values=, a layout that pools after its projections exposes no g: a note
    report = testing.compare(
        module, _x(7), layout=lay.replace(values=None), pairwise="embedded_gaussian", scale=0.5
    )
    assert "g" not in [r.name for r in report.rows] and report.ok
    assert any(n.startswith("g: the layout names no sub-module") for n in report.notes)


def test_a_scale_of_one_over_root_c_is_an_override() -> None:
    # compare(module, x, layout=Layout(...), pairwise=..., scale=...) as in the docs
    _, testing = torch_and_testing()
    blocks = _blocks()
    module = testing.randomize(blocks.QKVBlock(8, 4, scale="in"), 8)
    report = testing.compare(
        module, _x(8), layout=blocks.QKV_LAYOUT, pairwise="embedded_gaussian", scale=8**-0.5
    )
    assert report.ok and math.isclose(report.cfg.scale, 8**-0.5)


def test_the_docs_custom_layout_runs() -> None:
    # docs/oracle.md shows a hand-written block and its Layout in full: it must pass
    torch_and_testing()
    text = (Path(__file__).resolve().parents[1] / "docs" / "oracle.md").read_text()
    snippet = next(
        b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "class MyNonLocal" in b
    )
    namespace: dict = {}
    exec(compile(snippet, "docs/oracle.md", "exec"), namespace)  # asserts report.ok
    assert namespace["report"].cfg.sub_sample == (2, 2)


def test_layout_values_are_checked() -> None:
    with pytest.raises(ValueError, match=r"kind must be one of \('conv', 'linear'\)"):
        Layout(g="g", z="z", kind="dense")
    with pytest.raises(TypeError, match=r"theta= must be a dotted path \(str\) or None, got 3"):
        Layout(theta=3, g="g", z="z")
    with pytest.raises(ValueError, match=r"pool_order must be one of"):
        Layout(g="g", z="z", pool_order="middle")
    with pytest.raises(ValueError, match=r"unknown layout role\(s\) \['foo'\]"):
        Layout(g="g", z="z", pooled={"foo": "x"})
    with pytest.raises(ValueError, match="unknown preset 'keras'"):
        Layout(g="g", z="z", preset="keras")
    with pytest.raises(TypeError, match="register_layout needs a Layout, got dict"):
        register_layout("x", {"g": "g"})
    with pytest.raises(TypeError, match="layout must be a registered name or a Layout, got int"):
        get_layout(3)
    assert Layout(g="g", z="z") == Layout(g="g", z="z")  # frozen values, hashable
    assert hash(LAYOUTS["mmcv"]) == hash(LAYOUTS["mmcv"].replace())
