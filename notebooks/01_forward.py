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
# # 01 · The forward pass, step by step
#
# **What you will learn**
#
# - what the Non-local block computes, one array at a time: θ, φ, g, the pairwise matrix
#   f, its normalisation C(x), y and z, with the shape of each (B, C, C′, N, N′);
# - how the four pairwise functions of the paper differ (Gaussian, embedded Gaussian,
#   dot product, concatenation), and which rows of the attention sum to 1;
# - where max-pool subsampling enters (N′ < N), and why a fresh block is the identity.
#
# Every step below calls the layer that `nlref.forward` itself uses (`nlref.layers`,
# `nlref.pairwise`); at the end we check that the pieces reproduce `nlref.forward`
# exactly. Nothing is re-implemented here.

# %%
# %matplotlib inline
import numpy as np

import nlref
from nlref import viz
from nlref.layers import aggregate, batchnorm, maxpool, projection

# %% [markdown]
# ## The input and the configuration
#
# x has shape (B, C, *S): a batch of B feature maps with C channels over a spatial grid S
# (1D, 2D or 3D). The block flattens S into N = prod(S) positions. We take a tiny 2D case,
# with the keys max-pooled 2×2 as in the paper ("a max pooling layer after φ and g").

# %%
B, C, S = 2, 8, (4, 6)
cfg = nlref.NonLocalConfig(
    in_channels=C, inter_channels=4, pairwise="embedded_gaussian", sub_sample=(2, 2)
)
params = nlref.init_params(cfg, rng=0, scheme="random")  # non-degenerate weights
x = np.random.default_rng(0).standard_normal((B, C, *S))
N = int(np.prod(S))
print(f"x {x.shape}: B={B}, C={C}, C'={cfg.inter_channels}, S={S}, N={N}")
print({name: tuple(p.shape) for name, p in params.items()})

# %% [markdown]
# ## Step 1: queries θ, keys φ and values g
#
# Each is a 1×1 projection (a matrix W of shape (C′, C) applied at every position):
# θ = W_θ x + b_θ on all N positions; φ and g are projected, then max-pooled to
# N′ = ⌊4/2⌋·⌊6/2⌋ = 6 key positions.

# %%
xf = x.reshape(B, C, N)  # (B, C, N)
theta, _ = projection.forward(xf, params["theta.weight"], params["theta.bias"])


def project_then_pool(layer):
    u, _ = projection.forward(xf, params[f"{layer}.weight"], params[f"{layer}.bias"])
    pooled, _ = maxpool.forward(u.reshape(B, -1, *S), cfg.sub_sample)
    return pooled.reshape(B, pooled.shape[1], -1)


phi, g = project_then_pool("phi"), project_then_pool("g")
N_keys = phi.shape[-1]
print(f"theta {theta.shape} = (B, C', N)")
print(f"phi   {phi.shape} = (B, C', N')   N' = {N_keys}")
print(f"g     {g.shape} = (B, C', N')")

# %% [markdown]
# ## Step 2: the pairwise function f and its normalisation C(x)
#
# The attention is A = f(θᵢ, φⱼ) / C(x), one row per query i and one column per key j:
# shape (B, N, N′). Each variant lives in one module of `nlref.pairwise` and is found by
# name in a registry:

# %%
for variant in nlref.pairwise.all_variants():
    print(f"{variant.name:<18} {variant.formula}")

# %% [markdown]
# Run each of them on the same θ and φ. The Gaussian compares x itself (no θ, φ
# projections), so it gets x and pool(x); the concatenation has its own weight
# w_f = [w_θ; w_φ]. The softmax variants' rows sum to 1; the others divide by N′ and
# their rows do not.

# %%
pooled_x, _ = maxpool.forward(x, cfg.sub_sample)
pooled_x = pooled_x.reshape(B, C, -1)
w_f = np.random.default_rng(1).standard_normal(2 * cfg.inter_channels)

attentions = {}
for variant in nlref.pairwise.all_variants():
    q, k = (xf, pooled_x) if not variant.embeds else (theta, phi)
    extra = {"concat.weight": w_f} if variant.extra_params(cfg.inter_channels) else {}
    scale = 1.0  # the paper has no scale (cfg.scale=None means 1)
    A, _ = variant.forward(q, k, extra, scale)
    attentions[variant.name] = A
    rows = A.sum(axis=-1)
    print(
        f"{variant.name:<18} A {A.shape}  row sums in [{rows.min():.3f}, {rows.max():.3f}]"
        f"  min entry {A.min():+.3f}"
    )

# %% [markdown]
# The dot product can be negative: it is a similarity, not a probability. The
# concatenation's ReLU makes it non-negative, but its rows need not sum to 1.
#
# Here is the whole 24 × 6 matrix of the embedded Gaussian for the first sample: row i is
# where query i looks.

# %%
viz.plot_attention_matrix(attentions["embedded_gaussian"], size=4.0)

# %% [markdown]
# ## Step 3: aggregate, project back, normalise, add the input
#
# y = g Aᵀ is, at each query i, the attention-weighted mean of the values:
# yᵢ = Σⱼ Aᵢⱼ gⱼ, of shape (B, C′, N). Then W_z maps C′ back to C, batch norm follows,
# and the residual connection adds x: z = BN(W_z y + b_z) + x.

# %%
A = attentions["embedded_gaussian"]
y, _ = aggregate.forward(A, g)
h, _ = projection.forward(y, params["z.weight"], params["z.bias"])
o, bn_cache = batchnorm.forward(
    h,
    params["bn.weight"],
    params["bn.bias"],
    params["bn.running_mean"],
    params["bn.running_var"],
    training=True,
    eps=cfg.bn_eps,
    momentum=cfg.bn_momentum,
)
z_steps = (o + xf).reshape(x.shape)
print(f"y {y.shape} = (B, C', N);  W_z y {h.shape} = (B, C, N);  z {z_steps.shape}")

# %% [markdown]
# The same thing in one call, `nlref.forward`, which also returns a cache for the backward
# pass (notebook 02) with the attention in it:

# %%
z, cache = nlref.forward(x, params, cfg, training=True)
np.testing.assert_allclose(z_steps, z, rtol=1e-12, atol=1e-12)
np.testing.assert_allclose(cache.attention, A, rtol=1e-12, atol=1e-12)
print("step by step == nlref.forward; cache.attention", cache.attention.shape)

# %% [markdown]
# ## Why a fresh block is the identity
#
# The paper initialises BN's scale γ to 0, so BN outputs β = 0 and z = x: a Non-local
# block can be inserted into a trained network without changing it. `init_params` with the
# default `scheme="paper"` does that:

# %%
fresh = nlref.init_params(cfg, rng=0)  # scheme="paper"
z0, _ = nlref.forward(x, fresh, cfg, training=True)
print("max |z - x| for a fresh block:", np.abs(z0 - x).max())

# %% [markdown]
# ## Shapes, once more, for every variant and pooling
#
# With pooling off, N′ = N; the Gaussian has no θ/φ parameters and compares C channels.

# %%
for name in nlref.pairwise.names():
    for sub_sample in (None, (2, 2)):
        c = nlref.NonLocalConfig(in_channels=C, pairwise=name, sub_sample=sub_sample)
        p = nlref.init_params(c, rng=0, scheme="random")
        _, ch = nlref.forward(x, p, c)
        print(f"{name:<18} sub_sample={sub_sample!s:<7} attention {ch.attention.shape}")

# %% [markdown]
# ## Exercises
#
# 1. Change `pool_order` to `"before_projection"` (the authors' Caffe2 code) and compare
#    `cache.attention` with the default. Why do they differ? (Hint: does max commute with
#    a projection whose weights have mixed signs?)
# 2. Set `scale=cfg.inter_channels ** -0.5` for the embedded Gaussian. How do the rows of
#    the attention change (look at their maxima)? Which public implementations use it
#    (docs/conventions.md)?
# 3. Show that the embedded Gaussian with W_θ = W_φ = I (and C′ = C, no biases) is the
#    Gaussian: build such params and compare the two attentions.
# 4. Use a 3D input (B, C, T, H, W) with `sub_sample=(1, 2, 2)`: what are N and N′?
