"""nlref's GCNet and DNL against the real modules, in float64: forward and every gradient.

- mmcv's ``ContextBlock`` (mmcv-lite), every pooling × fusion;
- timm's ``GlobalContext``, every ``use_attn`` × ``fuse_add`` × ``fuse_scale``, loaded from
  its own file when timm's package does not import (torchvision, see below);
- mmsegmentation's ``DisentangledNonLocal2d``, the class in the installed wheel's
  ``mmseg/models/decode_heads/dnl_head.py``, loaded without ``mmseg/__init__`` (which
  asserts mmcv < 2.2.0; its model package needs mmcv's compiled ops).

The weight mapping lives here for now. The findings about the real modules (their
initialisations, timm's channel rule, mmsegmentation's float32 scale, its failing
``sub_sample=True``, its in-place whitening) are asserted at the end.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import re
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest

from nlref import family
from nlref.family import DNLConfig, GCNetConfig, dnl, gcnet

from .conftest import REQUIRED, require

TOL = 1e-10
FUSIONS = (("channel_add",), ("channel_mul",), ("channel_add", "channel_mul"))


# ─── The real classes ─────────────────────────────────────────────────────────────────────


def load_from_file(module: str, stubs: Mapping[str, Callable[[], types.ModuleType]] = {}) -> Any:
    """Import ``module`` from its installed package without running the ``__init__`` of any
    package above it (each becomes an empty package on its real path); ``stubs`` stand in
    for modules it imports but never uses. ``sys.modules`` is restored afterwards."""
    top = module.split(".")[0]
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{top} is not installed")
    root = next(iter(spec.submodule_search_locations))
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] == top}
    for k in saved:
        del sys.modules[k]
    try:
        parts = module.split(".")
        for i in range(1, len(parts)):
            package = types.ModuleType(".".join(parts[:i]))
            package.__path__ = ["/".join([root, *parts[1:i]])]
            sys.modules[package.__name__] = package
        for name, make in stubs.items():
            sys.modules[name] = make()
        return importlib.import_module(module)
    finally:
        for k in [k for k in sys.modules if k.split(".")[0] == top]:
            del sys.modules[k]
        sys.modules.update(saved)


def _required(name: str, load: Callable[[], Any]) -> Any:
    """Like ``require``: a skip when missing, a failure when NLREF_REQUIRE names ``name``."""
    try:
        return load()
    except Exception as err:
        if name in REQUIRED:
            pytest.fail(f"{name} is required (NLREF_REQUIRE={sorted(REQUIRED)}) but: {err}")
        pytest.skip(f"{name} not available: {err}")


def mmcv_context_block() -> type:
    require("torch")
    return _required("mmcv", lambda: importlib.import_module("mmcv.cnn").ContextBlock)


def timm_global_context() -> type:
    """timm's class; its package imports torchvision, which fails beside torch 2.13.0 (CPU),
    so the module is loaded from its own file when the package import fails."""
    require("torch")

    def load() -> type:
        try:
            from timm.layers import GlobalContext

            return GlobalContext
        except Exception:  # torchvision raising on import
            return load_from_file("timm.layers.global_context").GlobalContext

    return _required("timm", load)


@functools.cache
def _load_mmseg_dnl() -> type:
    def fcn_head() -> types.ModuleType:
        stub = types.ModuleType("mmseg.models.decode_heads.fcn_head")
        stub.FCNHead = type("FCNHead", (importlib.import_module("torch").nn.Module,), {})
        return stub

    def registry() -> types.ModuleType:
        stub = types.ModuleType("mmseg.registry")
        stub.MODELS = types.SimpleNamespace(register_module=lambda: lambda cls: cls)
        return stub

    stubs = {"mmseg.registry": registry, "mmseg.models.decode_heads.fcn_head": fcn_head}
    return load_from_file("mmseg.models.decode_heads.dnl_head", stubs).DisentangledNonLocal2d


def mmseg_dnl() -> type:
    """mmsegmentation's ``DisentangledNonLocal2d`` from the installed wheel. The file's other
    class, ``DNLHead``, is never built: stand-ins satisfy its imports (``FCNHead``, whose
    module pulls in the whole model package, and the registry it registers in).
    mmsegmentation is installed by the test extra beside mmcv, so it is required with it."""
    require("torch")
    return _required("mmcv" if "mmcv" in REQUIRED else "mmsegmentation", _load_mmseg_dnl)


# ─── Weights in, gradients out ────────────────────────────────────────────────────────────


def gcnet_keys(module: Any, cfg: GCNetConfig) -> dict[str, str]:
    """nlref name -> the module's parameter name (mmcv's ContextBlock or timm's GlobalContext)."""
    mmcv = hasattr(module, "channel_add_conv")
    keys = {"mask.weight": "conv_mask.weight" if mmcv else "conv_attn.weight"}
    keys["mask.bias"] = keys["mask.weight"].replace("weight", "bias")
    for f in cfg.fusion:
        prefix = {"channel_add": "mlp_add", "channel_mul": "mlp_scale"}[f]
        steps = {"fc1": "fc1", "norm": "norm", "fc2": "fc2"}
        if mmcv:
            prefix, steps = f"{f}_conv", {"fc1": "0", "norm": "1", "fc2": "3"}
        for step, kind in ((s, k) for s in steps for k in ("weight", "bias")):
            keys[f"{f}.{step}.{kind}"] = f"{prefix}.{steps[step]}.{kind}"
    return {n: keys[n] for n in family.param_shapes(cfg)}


def dnl_keys(cfg: DNLConfig) -> dict[str, str]:
    """nlref name -> the parameter or buffer name in mmsegmentation's DNL."""
    keys = {}
    for name in family.param_shapes(cfg):
        layer, kind = name.split(".")
        module = {"mask": "conv_mask", "z": "conv_out.conv", "bn": "conv_out.bn"}
        keys[name] = f"{module.get(layer, layer + '.conv')}.{kind}"
    return keys


def load_weights(module: Any, params: Mapping[str, np.ndarray], keys: Mapping[str, str]) -> None:
    import torch

    state = module.state_dict()
    for name, key in keys.items():
        state[key].copy_(torch.tensor(params[name]).reshape(state[key].shape))


def compare(
    module: Any,
    keys: Mapping[str, str],
    block: Any,
    x: np.ndarray,
    params: Mapping,
    cfg: Any,
    training: bool = True,
) -> dict[str, float]:
    """Run the module and nlref on x, with one random upstream gradient; the worst absolute
    error of z, x̄ and each parameter's gradient (each also checked to carry signal)."""
    import torch

    module = module.double().train(training)
    load_weights(module, params, keys)
    xt = torch.tensor(x, requires_grad=True)
    zt = module(xt)
    dz = np.random.default_rng(3).standard_normal(tuple(zt.shape))
    zt.backward(torch.tensor(dz))
    z, cache = block.forward(x, dict(params), cfg, training)
    dx, grads = block.backward(dz, cache)
    named = dict(module.named_parameters())
    theirs = {"z": zt.detach().numpy(), "x": xt.grad.numpy()}
    theirs |= {n: named[keys[n]].grad.numpy().reshape(g.shape) for n, g in grads.items()}
    ours = {"z": z, "x": dx, **grads}
    errors = {n: float(np.abs(ours[n] - theirs[n]).max()) for n in ours}
    assert max(errors.values()) <= TOL, errors
    silent = {n for n, g in theirs.items() if np.abs(g).max() < 1e-8}
    assert silent == zero_by_construction(cfg, training) & set(grads), silent  # not vacuous
    return errors


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
    cfg = GCNetConfig(12, module.planes, pooling, fusion, ln_eps=1e-5)
    params = family.init_params(cfg, rng=1, scheme="random")
    x = np.random.default_rng(2).standard_normal((2, 12, 5, 6))
    errors = compare(module, gcnet_keys(module, cfg), gcnet, x, params, cfg)
    assert set(errors) == {"z", "x", *params}


@pytest.mark.parametrize(("fuse_add", "fuse_scale"), [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("use_attn", [True, False])
def test_timm_global_context_matches(use_attn: bool, fuse_add: bool, fuse_scale: bool) -> None:
    module = timm_global_context()(
        16, use_attn=use_attn, fuse_add=fuse_add, fuse_scale=fuse_scale, rd_ratio=0.3
    )
    fusion = (("channel_add",) if fuse_add else ()) + (("channel_mul",) if fuse_scale else ())
    rd = (module.mlp_add or module.mlp_scale).fc1.out_channels
    assert rd == 5  # make_divisible(16 · 0.3, 1, round_limit=0) = round(4.8)
    cfg = GCNetConfig(16, rd, "att" if use_attn else "avg", fusion, ln_eps=1e-6)
    params = family.init_params(cfg, rng=1, scheme="random")
    x = np.random.default_rng(2).standard_normal((2, 16, 4, 5))
    compare(module, gcnet_keys(module, cfg), gcnet, x, params, cfg)


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


# ─── mmsegmentation's DisentangledNonLocal2d ──────────────────────────────────────────────


def _dnl_case(use_scale: bool, temperature: float, norm: bool, exact: bool = False) -> tuple:
    module = mmseg_dnl()(
        8, temperature=temperature, use_scale=use_scale, mode="embedded_gaussian",
        norm_cfg=dict(type="BN") if norm else None,
    )  # fmt: skip
    c_inner = module.inter_channels
    scales = dnl.mmseg_scale(c_inner, use_scale, temperature)
    if exact:  # the exact float64 numbers, not mmsegmentation's float32 ones
        scales = {"scale": c_inner**-0.5 if use_scale else None, "temperature": temperature}
    cfg = DNLConfig(
        8, c_inner, **scales, norm="batchnorm" if norm else None,
        biases=("theta", "phi", "g") if norm else ("theta", "phi", "g", "z"),
    )  # fmt: skip
    params = family.init_params(cfg, rng=1, scheme="random")
    x = np.random.default_rng(2).standard_normal((2, 8, 4, 5))
    return module, cfg, params, x


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("temperature", [0.05, 0.5])
@pytest.mark.parametrize("use_scale", [True, False])
def test_mmseg_dnl_matches(use_scale: bool, temperature: float, norm: bool, training: bool) -> None:
    module, cfg, params, x = _dnl_case(use_scale, temperature, norm)
    errors = compare(module, dnl_keys(cfg), dnl, x, params, cfg, training)
    assert set(errors) == {"z", "x", *family.trainable_names(cfg)}


def test_mmseg_dnl_float32_scale_is_reproduced_not_ignored() -> None:
    """mmsegmentation's float32 √C′ and τ move z by more than the tolerance; nlref's
    ``mmseg_scale`` reproduces them (the test above), the exact float64 values do not."""
    module, cfg, params, x = _dnl_case(True, 0.05, False, exact=True)
    with pytest.raises(AssertionError) as failure:
        compare(module, dnl_keys(cfg), dnl, x, params, cfg)
    assert "'z'" in str(failure.value)


def test_mmseg_dnl_sub_sample_forward_fails() -> None:
    """Finding: with sub_sample=True the real forward raises. g is pooled to N′ = N/4 key
    positions but the unary mask is not: softmax(mask) (B, 1, N) @ g (B, N′, C′)."""
    import torch

    module = mmseg_dnl()(8, temperature=0.05, sub_sample=True).double()
    x = torch.tensor(np.random.default_rng(2).standard_normal((2, 8, 4, 6)))
    with pytest.raises(
        RuntimeError, match=re.escape("batch2 tensor to be: [2, 24] but got: [2, 6]")
    ):
        module(x)
    # nlref's definition: the unary term over the pooled keys, the mask pooled like φ and g.
    # The real module with that one change (its conv_mask followed by the same max-pool)
    # runs, and matches nlref.
    module.conv_mask = torch.nn.Sequential(module.conv_mask, torch.nn.MaxPool2d(2))
    cfg = DNLConfig(8, 4, **dnl.mmseg_scale(4, True, 0.05), sub_sample=(2, 2), norm=None)
    params = family.init_params(cfg, rng=1, scheme="random")
    pooled = {"phi.conv.": "phi.0.conv.", "g.conv.": "g.0.conv.", "conv_mask.": "conv_mask.0."}
    keys = {}
    for name, key in dnl_keys(cfg).items():  # phi, g and conv_mask are (conv, max-pool) now
        prefix = next((p for p in pooled if key.startswith(p)), None)
        keys[name] = key if prefix is None else pooled[prefix] + key[len(prefix) :]
    compare(module, keys, dnl, x.numpy(), params, cfg)


@pytest.mark.parametrize("use_scale", [True, False])
def test_mmseg_dnl_inplace_whitening_keeps_backward_correct(use_scale: bool) -> None:
    """Finding: ``theta_x -= theta_x.mean(...)`` and ``phi_x -= ...`` run in place inside the
    autograd graph (and ``pairwise_weight /= ...`` with use_scale), yet backward neither
    raises nor goes wrong in float64 on the CPU: no tensor that autograd saved is
    overwritten (a 1×1 conv saves its input, not its output; the mean saves nothing), so
    every gradient equals nlref's hand-derived one."""

    module, cfg, params, x = _dnl_case(use_scale, 0.05, True)
    outputs = []
    module.theta.register_forward_hook(lambda m, args, out: outputs.append(out))
    module.phi.register_forward_hook(lambda m, args, out: outputs.append(out))
    errors = compare(module, dnl_keys(cfg), dnl, x, params, cfg)  # backward ran, and agrees
    assert [(t.requires_grad, t._version) for t in outputs] == [(True, 1), (True, 1)]
    grads = {n: e for n, e in errors.items() if n not in ("z", "x")}
    assert len(grads) == len(family.trainable_names(cfg)) and max(grads.values()) <= TOL


def test_mmseg_dnl_gaussian_mode_whitens_the_callers_input_in_place() -> None:
    """Finding, about a mode nlref's DNL does not model (it is the embedded Gaussian): with
    mode="gaussian", θ and φ are views of x, so the in-place mean subtraction changes the
    caller's x, and fails when x requires a gradient."""
    import torch

    module = mmseg_dnl()(8, temperature=0.05, mode="gaussian").double()
    x = torch.tensor(np.random.default_rng(2).standard_normal((2, 8, 4, 4)))
    before = x.clone()
    module(x)
    assert not torch.equal(x, before)
    np.testing.assert_allclose(x.flatten(2).mean(-1).numpy(), 0, atol=1e-15)  # whitened
    with pytest.raises(RuntimeError, match="a view of a leaf Variable that requires grad"):
        module(before.requires_grad_())
