# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · nlref as an oracle for a PyTorch module
#
# **What you will learn**
#
# - why "my Non-local block is correct" needs a convention: the public implementations
#   compute different numbers from the same weights (pool order, logit scale, C′, biases),
#   and `nlref.preset` names each one;
# - how `nlref.testing.compare` checks a real PyTorch module against nlref, forward and
#   backward, tensor by tensor, in float64, and how to read its report;
# - how the report's *first divergence* points at a bug: a wrong scale shows at the
#   attention, a wrong pool order at the values g, a wrong gradient at the first
#   parameter it reaches;
# - how the report's *diagnosis* names the convention a differing module follows;
# - how to check a block of your own, with your own sub-module names, through a `Layout`,
#   and every block of a whole model with `check_model`;
# - how a module run in float16 is judged: against the error an honest float16
#   implementation makes, not against a fixed tolerance;
# - why a freshly initialised block is a *vacuous* check, and what to do about it;
# - what nlref found in mmcv's concatenation mode: its forward is right, its backward
#   cannot run, and one in-place division is the whole defect.
#
# The modules are the real mmcv-lite 2.2.0 `NonLocal2d` (in the `test` extra) and small
# hand-written blocks. Everything below calls nlref; nothing of the block is
# re-implemented here.

# %%
import tempfile

import numpy as np
import torch
from mmcv.cnn import NonLocal2d

import nlref
import nlref.testing
from nlref.interop.torch import Layout, from_torch, key_map

# %% [markdown]
# ## Same weights, different numbers
#
# A preset is the `NonLocalConfig` of one implementation. For C = 64 input channels,
# mmcv, timm and pytorchvideo disagree on C′, on the scale α that multiplies θᵢᵀφⱼ, and on
# whether the key side is pooled before or after its projection:

# %%
for name in ("paper", "mmcv", "timm", "pytorchvideo"):
    cfg = nlref.preset(name, 64)
    scale = "1" if cfg.scale is None else f"{cfg.scale:.4f}"
    print(
        f"{name:<13} C'={cfg.inter_channels:<3} alpha={scale:<7} {cfg.pool_order:<18} "
        f"biases={cfg.biases}"
    )

# %% [markdown]
# The full table, generated from the presets, is in `docs/oracle.md`
# (`nlref.presets.table()`).
#
# ## Compare a real module
#
# `randomize` gives every weight and BN statistic a random, non-degenerate value: with the
# implementations' own initialisation (BN γ = 0, or a zero output conv) the block is the
# identity and most gradients are zero, so a comparison would check almost nothing.

# %%
block = nlref.testing.randomize(NonLocal2d(8, mode="embedded_gaussian", sub_sample=True), 0)
x = np.random.default_rng(0).standard_normal((2, 8, 5, 7))
report = nlref.testing.compare(block, x)
print(report)

# %% [markdown]
# Each row is one tensor, in the order the computation produces it: the values g and the
# attention (mmcv exposes it through its `embedded_gaussian()` method), the output z, then
# every parameter gradient in the order backward reaches it, and dx last. The errors are
# around 1e-15: float64 rounding. `block` itself was not touched (compare works on a
# float64 copy), and `report.ok` is what a test would assert.
#
# What did nlref read from the module? `from_torch` recognised the mmcv layout, took the
# variant, the scale and the pool from the module's attributes, and the weights from its
# `state_dict`, with the 1×1 conv dims squeezed:

# %%
cfg, params = from_torch(block)
print(cfg)
for name, key in key_map("mmcv", cfg).items():
    print(f"{name:<14} <- {key:<24} {params[name].shape}")

# %% [markdown]
# ## Where a wrong convention shows
#
# Read the same mmcv module with timm's scale, 1/√C instead of 1/√C′. compare still
# runs, and its first diverging tensor is the attention, before z and every gradient:

# %%
wrong = nlref.testing.compare(block, x, scale=8**-0.5)
print("ok:", wrong.ok, "| first divergence:", wrong.first_divergence)
print(wrong.verdict())

# %% [markdown]
# The values g do not depend on the scale, so that row still matches:

# %%
for row in wrong.rows[:3]:
    print(f"{row.name:<10} {row.status:<5} max abs err {row.max_abs_err:.1e}")

# %% [markdown]
# And the report says *why*: nlref reran itself with the conventions that implementations
# disagree on (the scale, the pool order and kernel, BN's mode, each bias, the variant),
# and one of them makes the module match:

# %%
print(wrong.diagnosis)

# %% [markdown]
# ## Your own block: a `Layout`
#
# Most hand-written blocks call their layers `query_conv`, `key_conv`, `value_conv`. A
# `Layout` tells nlref where each projection lives; what the weights cannot tell (here:
# the embedded Gaussian, and which scale) is given once, never guessed from the code.


# %%
class MyBlock(torch.nn.Module):
    def __init__(self, c, inner):
        super().__init__()
        self.query_conv = torch.nn.Conv2d(c, inner, 1)
        self.key_conv = torch.nn.Conv2d(c, inner, 1)
        self.value_conv = torch.nn.Conv2d(c, inner, 1)
        self.out_conv = torch.nn.Conv2d(inner, c, 1)
        self.out_bn = torch.nn.BatchNorm2d(c)

    def forward(self, x):
        b, _, h, w = x.shape
        q = self.query_conv(x).flatten(2).transpose(1, 2)
        k = self.key_conv(x).flatten(2)
        v = self.value_conv(x).flatten(2).transpose(1, 2)
        a = torch.softmax(q @ k / x.shape[1] ** 0.5, dim=-1)  # which scale is this?
        y = (a @ v).transpose(1, 2).reshape(b, -1, h, w)
        return x + self.out_bn(self.out_conv(y))


layout = Layout(theta="query_conv", phi="key_conv", g="value_conv", z="out_conv", bn="out_bn")
custom = nlref.testing.randomize(MyBlock(8, 4), 2)
check = nlref.testing.compare(custom, x, layout=layout, pairwise="embedded_gaussian", scale=0.5)
print(check.verdict())
print(check.diagnosis)

# %% [markdown]
# We claimed the usual 1/√C′ = 0.5; the block divides by √C (timm's convention), and the
# diagnosis says so. `Layout(config={"pairwise": ..., "scale": ...})` would give those
# values once, and `nlref.interop.register_layout("mine", layout)` would make nlref
# recognise such blocks by itself.
#
# ## Whole models
#
# `check_model` runs a model once, captures the input of every block it recognises, and
# compares each one:

# %%
model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), NonLocal2d(8, sub_sample=True), MyBlock(8, 4))
nlref.testing.randomize(model, 4)
mine_layout = layout.replace(config={"pairwise": "embedded_gaussian", "scale": 8**-0.5})
print(nlref.testing.check_model(model, torch.randn(2, 3, 5, 7), layouts=[mine_layout]))

# %% [markdown]
# ## Low precision
#
# In float16 a module cannot match float64 to 1e-10. How close must it come? nlref
# emulates an honest float16 implementation with its own steps, rounding every tensor to
# float16 between them, and allows each of the module's tensors 16 times the error of
# that emulation. The columns say how far from it each tensor is:

# %%
half = nlref.testing.compare(block, x, dtype="float16")
for row in half.rows[:4]:
    print(
        f"{row.name:<10} err {row.max_abs_err:.1e}  expected {row.expected_err:.1e}  "
        f"ratio {row.ratio:.2f}  {row.status}"
    )
print(half.verdict())

# %% [markdown]
# ## A vacuous check
#
# A block straight from its constructor has BN's γ = 0: its output is x, and every
# gradient upstream of the BN is zero, in the module and in nlref alike. Those rows match,
# but they check nothing, and the report says so (`assert_matches` even refuses them):

# %%
fresh = NonLocal2d(8, sub_sample=True, norm_cfg=dict(type="BN"))
vacuous = nlref.testing.compare(fresh, x)
print(vacuous.ok, vacuous.vacuous)
print(nlref.testing.compare(fresh, x, randomize=True).vacuous)  # a randomised copy

# %% [markdown]
# ## A bug in your own module
#
# A classic slip in the dot-product variant: normalising by N, the number of *queries*,
# instead of N′, the number of keys after pooling. Here it is in a module that otherwise
# keeps mmcv's layout (so that nlref can read it):


# %%
class MyNonLocal(NonLocal2d):
    def dot_product(self, theta_x, phi_x):
        pairwise_weight = torch.matmul(theta_x, phi_x)
        return pairwise_weight / theta_x.shape[1]  # bug: N queries, should be N' keys


mine = nlref.testing.randomize(MyNonLocal(8, mode="dot_product", sub_sample=True), 1)
bug = nlref.testing.compare(mine, x)
print(bug.verdict())
print(bug.diagnosis)

# %% [markdown]
# The diagnosis fitted a scale to the module and recognised the ratio: 6/35 = N′/N.

# %% [markdown]
# Without pooling N = N′ and the bug is invisible, which is why the tests of a block
# should always include a pooled case with odd sizes:

# %%
unpooled = nlref.testing.randomize(MyNonLocal(8, mode="dot_product", sub_sample=False), 1)
print(nlref.testing.compare(unpooled, x).verdict())

# %% [markdown]
# ## The mmcv concatenation finding
#
# mmcv's concatenation mode divides the ReLU's output by N′ *in place*
# (`pairwise_weight /= pairwise_weight.shape[-1]`), and autograd needs that output for the
# ReLU's backward. So its forward runs and its backward raises. compare does not crash: it
# records the module's error and still compares everything the module did compute.

# %%
concat = NonLocal2d(8, mode="concatenation", sub_sample=True)
nlref.testing.randomize(concat, 3)
finding = nlref.testing.compare(concat, x)
print("ok:", finding.ok, "| error in:", finding.module_error_stage)
print(finding.module_error[:120], "...")
for row in finding.rows:
    print(f"{row.stage:<9} {row.name:<14} {row.status}")

# %% [markdown]
# The forward (g, the attention, z) matches nlref; no gradient could be compared. Is the
# in-place division the whole defect? Replace just that line on this one module and
# compare again: every gradient now matches nlref's hand-derived backward.


# %%
def concatenation_fixed(self, theta_x, phi_x):
    h, w = theta_x.size(2), phi_x.size(3)
    pairs = torch.cat([theta_x.repeat(1, 1, 1, w), phi_x.repeat(1, 1, h, 1)], dim=1)
    pairwise_weight = self.concat_project(pairs)
    n, _, h, w = pairwise_weight.size()
    pairwise_weight = pairwise_weight.view(n, h, w)
    return pairwise_weight / pairwise_weight.shape[-1]  # out of place


concat.concatenation = concatenation_fixed.__get__(concat)
fixed = nlref.testing.compare(concat, x)
print(fixed.verdict())

# %% [markdown]
# ## In your own test suite
#
# `assert_matches` raises an `AssertionError` carrying the report's table, so one line
# checks a block in pytest; here it passes and returns the report:

# %%
report = nlref.testing.assert_matches(block, torch.randn(2, 8, 9, 6), training=False)
print(report.verdict())

# %% [markdown]
# For implementations that are not PyTorch modules (CUDA, C++, JAX), nlref writes golden
# vectors instead: inputs, parameters, outputs and every gradient, with a manifest of
# configs and tolerances (`nlref vectors --out DIR`, `docs/vectors.md`); for inference
# engines, `--format onnx` writes each case as `model.onnx` with its input and output:

# %%
with tempfile.TemporaryDirectory() as tmp:
    manifest = nlref.vectors.write(tmp, presets=["timm"])
    entry, arrays = nlref.vectors.load_case(tmp, manifest["cases"][0]["name"])
print(entry["name"], "->", sorted(arrays)[:6], "...")
print("float32 tolerance for z:", entry["tolerances"]["z"]["float32"]["atol"])

# %% [markdown]
# ## Exercises
#
# 1. Compare `NonLocal2d(8, mode="gaussian", sub_sample=True)` in training and in eval
#    mode (`training=False`). Which rows appear only in training mode, and why?
# 2. Build a pytorchvideo block (`nlref.testing.make_module("pytorchvideo", 8,
#    sub_sample=True)`) and compare it with `pool_order="after_projection"`. Which tensor
#    diverges first? Explain with one sentence about max-pooling and 1×1 projections.
# 3. In `MyNonLocal`, which sizes of x make the bug invisible even with `sub_sample=True`?
#    Check your answer with compare.
# 4. Freeze θ (`block.theta.conv.weight.requires_grad_(False)`) and compare again. What
#    does the report say about that row, and is the report still `ok`?
# 5. Make `MyBlock` forget its output conv's bias (`F.conv2d(y, self.out_conv.weight)`)
#    and compare it in training mode. Which row diverges first, and what does the
#    diagnosis say? Why does z itself still match?
# 6. Compare `MyNonLocal` (the dot-product bug above) in bfloat16. Is the bug still
#    visible at that precision? At which sizes of x would it hide below rounding?
# 7. Write golden vectors for the `mmcv` preset and load one case's `param/` arrays into
#    a `NonLocal2d` with `nlref.interop.torch.to_state_dict`. Does the module's output
#    match the file's `z`?
