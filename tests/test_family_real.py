"""nlref's GCNet and DNL against the real modules, through the oracle, in float64: forward
and every gradient.

- mmcv's ``ContextBlock`` (mmcv-lite), every pooling × fusion (layout ``mmcv-gc``);
- timm's ``GlobalContext``, every ``use_attn`` × ``fuse_add`` × ``fuse_scale`` (layout
  ``timm-gc``), loaded by :func:`nlref.testing.load_timm` where timm's package does not
  import (torchvision);
- mmsegmentation's ``DisentangledNonLocal2d`` (layout ``dnl``), the class in the installed
  wheel's ``mmseg/models/decode_heads/dnl_head.py``, loaded by
  :func:`nlref.testing.load_mmseg_dnl` without ``mmseg/__init__`` (which asserts
  mmcv < 2.2.0; its model package needs mmcv's compiled ops).

The weight mapping is the layouts' (:data:`nlref.interop.LAYOUTS`): each test builds the
real module, gives it random weights (:func:`nlref.testing.randomize`) and calls
:func:`nlref.testing.compare`. The findings about the real modules (their
initialisations, timm's channel rule, mmsegmentation's float32 scale, its failing
``sub_sample=True``, its in-place whitening) are asserted at the end.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

import numpy as np
import pytest

from nlref.family import DNLConfig, GCNetConfig

from .conftest import require, require_loaded

TOL = 1e-10
FUSIONS = (("channel_add",), ("channel_mul",), ("channel_add", "channel_mul"))


# ─── The real classes ─────────────────────────────────────────────────────────────────────


def nlref_testing() -> Any:
    require("torch")
    import nlref.testing

    return nlref.testing


def mmcv_context_block() -> type:
    nlref_testing()
    return require_loaded("mmcv", lambda: importlib.import_module("mmcv.cnn").ContextBlock)


def timm_global_context() -> type:
    """timm's class, through ``load_timm`` (its package imports torchvision, which fails
    beside torch 2.13.0, CPU)."""
    load = nlref_testing().load_timm
    return require_loaded("timm", lambda: load("timm.layers.global_context").GlobalContext)


def mmseg_dnl() -> type:
    """mmsegmentation's ``DisentangledNonLocal2d`` from the installed wheel (through
    ``load_mmseg_dnl``)."""
    return require_loaded("mmsegmentation", nlref_testing().load_mmseg_dnl)


# ─── The check ────────────────────────────────────────────────────────────────────────────


def check(module: Any, x: np.ndarray, seed: int = 0, **kwargs: Any) -> Any:
    """The oracle on a randomised copy of ``module``: everything matches to 1e-10, every
    gradient of the config is compared, and the ones that carry no signal are exactly
    those that are zero by construction. Returns the report."""
    report = nlref_testing().compare(module, x, randomize=True, seed=seed, **kwargs)
    assert report.ok, str(report)
    compared = {r.name for r in report.rows if r.compared}
    grads = {r.name for r in report.rows if r.stage == "backward" and r.name != "dx"}
    from nlref import family

    assert grads == set(family.trainable_names(report.cfg)) and {"z", "dx"} <= compared
    assert max(r.max_abs_err for r in report.rows if r.compared) <= TOL
    silent = {r.name for r in report.rows if r.compared and r.magnitude < 1e-8}
    assert silent == zero_by_construction(report.cfg, report.training) & grads, silent
    return report


def zero_by_construction(cfg: Any, training: bool) -> set[str]:
    """The gradients that are exactly zero whatever the weights: a bias added before a
    softmax (the same logit for every position: b_k, b_m); with DNL, θ's and φ's biases
    (the whitening subtracts them again), and with training-mode BN, g's bias (both
    terms' rows sum to 1, so it shifts every position of W_z y alike and the batch mean
    removes it) and z's."""
    zero = {"mask.bias"}
    if isinstance(cfg, DNLConfig):
        zero |= {"theta.bias", "phi.bias"}
        if cfg.norm is not None and training:
            zero |= {"g.bias", "z.bias"}
    return zero


# ─── mmcv ContextBlock and timm GlobalContext ─────────────────────────────────────────────


@pytest.mark.parametrize("fusion", FUSIONS, ids=lambda f: "+".join(f))
@pytest.mark.parametrize("pooling", ["att", "avg"])
def test_mmcv_context_block_matches(pooling: str, fusion: tuple[str, ...]) -> None:
    module = mmcv_context_block()(12, ratio=0.3, pooling_type=pooling, fusion_types=fusion)
    assert module.planes == 3  # int(12 * 0.3): C′ = int(C · ratio), truncated
    x = np.random.default_rng(2).standard_normal((2, 12, 5, 6))
    report = check(module, x)
    assert report.layout == "mmcv-gc"
    assert report.cfg == GCNetConfig(12, 3, pooling, fusion, ln_eps=1e-5)
    exposed = {"context", "attention"} if pooling == "att" else {"context"}
    assert exposed <= {r.name for r in report.rows if r.compared}  # softmax, spatial_pool


@pytest.mark.parametrize(("fuse_add", "fuse_scale"), [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("use_attn", [True, False])
def test_timm_global_context_matches(use_attn: bool, fuse_add: bool, fuse_scale: bool) -> None:
    module = timm_global_context()(
        16, use_attn=use_attn, fuse_add=fuse_add, fuse_scale=fuse_scale, rd_ratio=0.3
    )
    fusion = (("channel_add",) if fuse_add else ()) + (("channel_mul",) if fuse_scale else ())
    rd = (module.mlp_add or module.mlp_scale).fc1.out_channels
    assert rd == 5  # make_divisible(16 · 0.3, 1, round_limit=0) = round(4.8)
    x = np.random.default_rng(2).standard_normal((2, 16, 4, 5))
    report = check(module, x)
    assert report.layout == "timm-gc"
    assert report.cfg == GCNetConfig(16, rd, "att" if use_attn else "avg", fusion, ln_eps=1e-6)
    assert any("not exposed by GlobalContext" in n for n in report.notes)


def test_timm_channel_rule_rounds_to_nearest_with_no_round_limit() -> None:
    cls = timm_global_context()
    for c, ratio, divisor in [(16, 0.3, 1), (64, 1 / 8, 1), (20, 1 / 8, 1), (12, 1 / 8, 1),
                              (64, 0.2, 8), (96, 0.05, 8), (100, 1 / 16, 4)]:  # fmt: skip
        v = c * ratio
        expected = max(divisor, int(v + divisor / 2) // divisor * divisor)
        module = cls(c, rd_ratio=ratio, rd_divisor=divisor)
        assert module.mlp_scale.fc1.out_channels == expected, (c, ratio, divisor)
    assert cls(64, rd_channels=7).mlp_scale.fc1.out_channels == 7  # rd_channels wins
    # round_limit=0: 96 · 0.05 = 4.8 gives 8 (nearest multiple), 12 / 8 = 1.5 gives 2
    assert cls(96, rd_ratio=0.05, rd_divisor=8).mlp_scale.fc1.out_channels == 8
    assert cls(12).mlp_scale.fc1.out_channels == 2


def test_fresh_blocks_mmcv_is_the_paper_timm_is_not() -> None:
    import torch

    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    add = mmcv_context_block()(16, 1 / 4, fusion_types=("channel_add",)).double()
    mul = mmcv_context_block()(16, 1 / 4, fusion_types=("channel_mul",)).double()
    assert torch.equal(add(x), x) and torch.equal(mul(x), x / 2)  # as nlref's paper init
    cls = timm_global_context()
    gca = cls(16, fuse_add=True, fuse_scale=False).double()  # timm's attn_layer="gca"
    assert not torch.any(gca.mlp_add.fc2.weight) and torch.any(gca.mlp_add.fc2.bias)
    assert torch.allclose(gca(x), x + gca.mlp_add.fc2.bias[:, None, None], atol=1e-12)
    torch.manual_seed(0)
    gc = cls(256, init_last_zero=True)  # timm's attn_layer="gc": the flag is stored, unused
    assert torch.any(gc.mlp_scale.fc2.weight) and gc.init_last_zero
    assert float(gc.conv_attn.weight.detach().std()) == pytest.approx(np.sqrt(2 / 256), rel=0.2)
    # the fresh mmcv block, compared as it is: z matches, but every gradient upstream of
    # the zero W₂ is identically zero, which the report calls vacuous
    report = nlref_testing().compare(add, x.numpy())
    assert report.ok and "channel_add.fc1.weight" in report.vacuous


# ─── mmsegmentation's DisentangledNonLocal2d ──────────────────────────────────────────────


def _dnl(use_scale: bool, temperature: float, norm: bool, **kwargs: Any) -> Any:
    return mmseg_dnl()(
        8, temperature=temperature, use_scale=use_scale, mode="embedded_gaussian",
        norm_cfg=dict(type="BN") if norm else None, **kwargs,
    )  # fmt: skip


X_DNL = np.random.default_rng(2).standard_normal((2, 8, 4, 5))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("temperature", [0.05, 0.5])
@pytest.mark.parametrize("use_scale", [True, False])
def test_mmseg_dnl_matches(use_scale: bool, temperature: float, norm: bool, training: bool) -> None:
    from nlref.interop import mmseg_scale

    report = check(_dnl(use_scale, temperature, norm), X_DNL, training=training)
    assert report.layout == "dnl"  # recognised before mmcv's NonLocal2d, its parent class
    assert report.cfg == DNLConfig(
        8, 4, **mmseg_scale(4, use_scale, temperature), norm="batchnorm" if norm else None,
        biases=("theta", "phi", "g") if norm else ("theta", "phi", "g", "z"),
    )  # fmt: skip
    assert {"g", "attention"} <= {r.name for r in report.rows if r.compared}


def test_mmseg_dnl_float32_scale_is_reproduced_not_ignored() -> None:
    """mmsegmentation's float32 √C′ and τ move z by more than the tolerance: the layout
    reproduces them (the test above); checked with the exact float64 values instead, the
    module fails, first at the attention it exposes, and the diagnosis names the
    convention."""
    report = nlref_testing().compare(
        _dnl(True, 0.05, False), X_DNL, randomize=True, scale=4**-0.5, temperature=0.05
    )
    assert not report.ok and report.first_divergence == "attention"
    assert 1e-10 < report.row("z").max_abs_err < 1e-7
    assert report.diagnosis.startswith(
        "diagnosis: scale: the module behaves as mmsegmentation's float32 1/√C′ and τ "
        "(use_scale=True), nlref used the exact 1/√C′ = 0.5 and τ = 0.05 in float64"
    )


def test_mmseg_dnl_sub_sample_forward_fails() -> None:
    """Finding: with sub_sample=True the real forward raises. g is pooled to N′ = N/4 key
    positions but the unary mask is not: softmax(mask) (B, 1, N) @ g (B, N′, C′). The
    oracle says so, and shows that g and the pairwise attention it did compute match."""
    import torch

    from nlref.interop import LAYOUTS

    module = _dnl(True, 0.05, False, sub_sample=True)
    x = np.random.default_rng(2).standard_normal((2, 8, 4, 6))
    report = nlref_testing().compare(module, x, randomize=True)
    assert report.module_error_stage == "forward" and not report.ok
    assert "batch2 tensor to be: [2, 24] but got: [2, 6]" in report.module_error
    assert report.row("g").ok and report.row("attention").ok
    assert report.cfg.sub_sample == (2, 2)
    # nlref's definition: the unary term over the pooled keys, the mask pooled like φ and g.
    # The real module with that one change (its conv_mask followed by the same max-pool)
    # runs, and matches nlref; the layout with the mask's new path describes it.
    module.conv_mask = torch.nn.Sequential(module.conv_mask, torch.nn.MaxPool2d(2))
    pooled = dict(LAYOUTS["dnl"].pooled) | {"mask": "conv_mask.0"}
    check(module, x, layout=LAYOUTS["dnl"].replace(pooled=pooled))


@pytest.mark.parametrize("use_scale", [True, False])
def test_mmseg_dnl_inplace_whitening_keeps_backward_correct(use_scale: bool) -> None:
    """Finding: ``theta_x -= theta_x.mean(...)`` and ``phi_x -= ...`` run in place inside the
    autograd graph (and ``pairwise_weight /= ...`` with use_scale), yet backward neither
    raises nor goes wrong in float64 on the CPU: no tensor that autograd saved is
    overwritten (a 1×1 conv saves its input, not its output; the mean saves nothing), so
    every gradient equals nlref's hand-derived one."""
    module = _dnl(use_scale, 0.05, True)
    outputs: list[Any] = []
    module.theta.register_forward_hook(lambda m, args, out: outputs.append(out))
    module.phi.register_forward_hook(lambda m, args, out: outputs.append(out))
    report = check(module, X_DNL)  # the oracle's copy keeps the hooks; backward ran, agrees
    assert [(t.requires_grad, t._version) for t in outputs] == [(True, 1), (True, 1)]
    assert report.module_error is None and len(report.cfg.biases) == 3


def test_mmseg_dnl_gaussian_mode_whitens_the_callers_input_in_place() -> None:
    """Finding, about a mode nlref's DNL does not model (it is the embedded Gaussian): with
    mode="gaussian", θ and φ are views of x, so the in-place mean subtraction changes the
    caller's x, and fails when x requires a gradient. The layout refuses the mode."""
    import torch

    module = mmseg_dnl()(8, temperature=0.05, mode="gaussian").double()
    x = torch.tensor(np.random.default_rng(2).standard_normal((2, 8, 4, 4)))
    before = x.clone()
    module(x)
    assert not torch.equal(x, before)
    np.testing.assert_allclose(x.flatten(2).mean(-1).numpy(), 0, atol=1e-15)  # whitened
    with pytest.raises(RuntimeError, match="a view of a leaf Variable that requires grad"):
        module(before.requires_grad_())
    x = before.detach().numpy()
    with pytest.raises(ValueError, match=re.escape("mode='gaussian': nlref's disentangled")):
        nlref_testing().compare(module, x, layout="dnl")
    # without θ it is not recognised as a DNL; as its parent, mmcv's NonLocal2d, it has
    # the unary projection too many
    with pytest.raises(ValueError, match=re.escape("unexpected ['conv_mask.bias'")):
        nlref_testing().compare(module, x)
