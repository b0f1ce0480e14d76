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
# - what the Non-local block computes, in the six steps of the paper's figure: embed
#   (θ, φ, g), attend (f / C(x)), aggregate (y = g Aᵀ), project out (W_z), batch norm and
#   the residual, with the shape of each array (B, C, C′, N, N′);
# - how the four pairwise functions of the paper differ (Gaussian, embedded Gaussian,
#   dot product, concatenation), and which rows of the attention sum to 1;
# - where max-pool subsampling enters (N′ < N), and why a fresh block is the identity;
# - where large problems leave the reference for the engine (tiles and threads).
#
# Every step below calls the function that `nlref.forward` itself calls (the step
# functions of `nlref.block`, the layers of `nlref.layers`, the variants of
# `nlref.pairwise`), and at the end the pieces reproduce `nlref.forward` bit for bit.
# Nothing is re-implemented here, and the code is shown from the source itself.

# %%
# %matplotlib inline
import inspect

import numpy as np

import nlref
from nlref import block, viz
from nlref.layers import aggregate, maxpool, projection

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
# ## The whole forward pass, as it runs
#
# This is `nlref.block.forward`, printed from its source. After checking its inputs, it
# runs the six steps in the paper's order. (`nlref.forward` runs this function, or, for
# problems too large or too slow for the plain formulas, the engine: the end of this
# notebook.) The rest of this notebook calls the same functions, one at a time.

# %%
print(inspect.getsource(block.forward))

# %% [markdown]
# ## Step 1, embed: queries θ, keys φ and values g
#
# Each is a 1×1 projection (a matrix W of shape (C′, C) applied at every position):
# θ = W_θ x + b_θ on all N positions; φ and g are projected, then max-pooled to
# N′ = ⌊4/2⌋·⌊6/2⌋ = 6 key positions. `block.embed` does all three and returns how each
# was made (its caches, for the backward).

# %%
xf = x.reshape(B, C, N)  # (B, C, N)
theta, phi, g, embed_caches = block.embed(xf, params, cfg, S)
N_keys = phi.shape[-1]
print(f"theta {theta.shape} = (B, C', N)")
print(f"phi   {phi.shape} = (B, C', N')   N' = {N_keys}")
print(f"g     {g.shape} = (B, C', N')")
for name, cache in zip(("theta", "phi", "g"), embed_caches, strict=True):
    steps = [f for f in ("pool_before", "projected", "pool_after") if getattr(cache, f)]
    print(f"{name:<5} made by: {' -> '.join(steps)}")

# %% [markdown]
# The same arrays from the layers themselves: a projection (`nlref.layers.projection`),
# then a max-pool over the spatial grid (`nlref.layers.maxpool`).

# %%
u, _ = projection.forward(xf, params["phi.weight"], params["phi.bias"])  # W_φ x + b_φ
pooled, _ = maxpool.forward(u.reshape(B, -1, *S), cfg.sub_sample)  # P(W_φ x + b_φ)
assert np.array_equal(pooled.reshape(B, -1, N_keys), phi)
theta_by_hand = params["theta.weight"] @ xf + params["theta.bias"][:, None]
np.testing.assert_allclose(theta_by_hand, theta, rtol=1e-13, atol=1e-13)
print("phi == P(W_phi x + b_phi);  theta == W_theta x + b_theta")

# %% [markdown]
# ## Step 2, attend: the pairwise function f and its normalisation C(x)
#
# The attention is A = f(θᵢ, φⱼ) / C(x), one row per query i and one column per key j:
# shape (B, N, N′). `block.attend` picks the variant named by `cfg.pairwise`. Each
# variant lives in one module of `nlref.pairwise` and is found by name in a registry:

# %%
A, attend_cache = block.attend(theta, phi, params, cfg)
print(f"A {A.shape} = (B, N, N')")
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
    attention, _ = variant.forward(q, k, extra, scale)
    attentions[variant.name] = attention
    rows = attention.sum(axis=-1)
    print(
        f"{variant.name:<18} A {attention.shape}  row sums in "
        f"[{rows.min():.3f}, {rows.max():.3f}]  min entry {attention.min():+.3f}"
    )
assert np.array_equal(attentions["embedded_gaussian"], A)

# %% [markdown]
# The dot product can be negative: it is a similarity, not a probability. The
# concatenation's ReLU makes it non-negative, but its rows need not sum to 1.
#
# Here is the whole 24 × 6 matrix of the embedded Gaussian for the first sample: row i is
# where query i looks.

# %%
viz.plot_attention_matrix(A, size=4.0)

# %% [markdown]
# ## Step 3, aggregate: y = g Aᵀ
#
# At each query i, yᵢ = Σⱼ Aᵢⱼ gⱼ is the attention-weighted mean of the values, of shape
# (B, C′, N): the non-local operation itself.

# %%
y, aggregate_cache = aggregate.forward(A, g)
print(f"y {y.shape} = (B, C', N)")
i = 5
np.testing.assert_allclose(y[0, :, i], g[0] @ A[0, i], rtol=1e-13, atol=1e-13)
print(f"query {i}: y_i = sum_j A_ij g_j")

# %% [markdown]
# ## Steps 4 to 6: project out, batch norm, residual
#
# W_z maps C′ back to C (h = W_z y + b_z), batch norm follows (o = BN(h), on the batch
# statistics in training mode; `normalise` also returns the updated running statistics),
# and the residual connection adds x: z = o + x.

# %%
h, project_cache = block.project("z", y, params)  # (B, C, N)
o, bn_cache, updated = block.normalise(h, params, cfg, training=True)
z_steps = (o + xf).reshape(x.shape)
print(f"h {h.shape} = (B, C, N);  o {o.shape};  z {z_steps.shape}")
print("updated running statistics:", sorted(updated))

# %% [markdown]
# The same thing in one call, `nlref.forward`. It runs exactly these functions, so the
# result is the same to the last bit, and its cache holds one entry per step (the
# backward of notebook 02 reads them):

# %%
z, cache = nlref.forward(x, params, cfg, training=True)
assert np.array_equal(z_steps, z) and np.array_equal(cache.attention, A)
print("step by step == nlref.forward, bit for bit;", type(cache).__name__, "fields:")
for field in ("embed_theta", "embed_phi", "embed_g", "attend", "aggregate", "project_out"):
    print(f"  {field:<12} {type(getattr(cache, field)).__name__}")
print(f"  batch_norm   {type(cache.batch_norm).__name__}")

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
# ## Large problems: the engine
#
# The attention is (B, N, N′): 1 GiB in float32 at N = N′ = 16,384. `nlref.forward`
# (`nlref/api.py`) asks `nlref.engine.plan` how to run. When the whole attention fits and
# one thread is enough, it runs `nlref.block.forward`, the steps above; otherwise
# `nlref.engine` runs the same steps in tiles of query rows (and on several CPU threads),
# and its backward recomputes each tile instead of keeping the whole attention. Here we
# ask for tiles of 8 queries:

# %%
for chunk_size in (None, 8):
    plan = nlref.engine.plan(x, cfg, chunk_size=chunk_size)
    print(
        f"chunk_size={chunk_size!s:<4}: uses_engine={plan.uses_engine}, "
        f"{plan.n_tiles} tile(s), {plan.threads} thread(s) ({plan.reason})"
    )
z_tiled, tiled_cache = nlref.forward(x, params, cfg, chunk_size=8)
print(type(tiled_cache).__name__, "max |z_tiled - z| =", np.abs(z_tiled - z).max())
print("rows 0-3 of the attention, recomputed:", tiled_cache.attention_rows(0, 3).shape)

# %% [markdown]
# ## Exercises
#
# 1. Change `pool_order` to `"before_projection"` (the authors' Caffe2 code) and compare
#    `cache.attention` with the default. Why do they differ? (Hint: does max commute with
#    a projection whose weights have mixed signs?) Print `block.embed`'s caches for both
#    orders: which one has a `pool_before`?
# 2. Set `scale=cfg.inter_channels ** -0.5` for the embedded Gaussian. How do the rows of
#    the attention change (look at their maxima)? Which public implementations use it
#    (docs/conventions.md)?
# 3. Show that the embedded Gaussian with W_θ = W_φ = I (and C′ = C, no biases) is the
#    Gaussian: build such params and compare the two attentions.
# 4. Use a 3D input (B, C, T, H, W) with `sub_sample=(1, 2, 2)`: what are N and N′?
# 5. With `chunk_size=8`, `tiled_cache.attention` raises an error: read it. Why does the
#    engine not keep the attention, and what does `attention_rows` do instead?
