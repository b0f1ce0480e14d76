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
# # 06 · From Non-local to GCNet and DNL
#
# **What you will learn**
#
# - how GCNet's global context block *is* a Non-local block whose query no longer depends
#   on the position, with its bottleneck moved after the pooling;
# - how the embedded Gaussian's attention row factors into a **whitened pairwise** row
#   and a **unary** map shared by every query, multiplied inside one softmax, and how the
#   disentangled non-local block (DNL) computes the two apart and adds them;
# - how to measure GCNet's observation ("trained attention maps are nearly the same for
#   every query") with `nlref.analysis`, on a block trained on a task where one global
#   context suffices and on notebook 04's task, where the markers must find each other;
# - what DNL's whitening and its unary term each contribute to the attention on a photo,
#   in a figure and in the explorer.
#
# Both blocks live in `nlref.family` (`gcnet.py`, `dnl.py`), each a forward and a
# hand-derived backward built from nlref's layers; their derivations are sections 11 to
# 13 of `docs/derivations.md`. Training the two small models below takes about half a
# minute on 2 CPU cores.

# %%
# %matplotlib inline
import inspect
import math

import numpy as np
from matplotlib.colors import LogNorm

import nlref
from nlref import analysis, explore, family, viz
from nlref.demo import family as demo_family
from nlref.demo import figures, optim, photo, toy
from nlref.demo.layers import conv2d
from nlref.layers import relu

rng = np.random.default_rng(0)

# %% [markdown]
# ## GCNet: the Non-local block with one query
#
# The embedded Gaussian computes, for every query i, the row
# softmax_j(α θᵢᵀφⱼ) and y_i = Σⱼ A_ij g_j. Suppose the query is the same vector t at
# every position (W_θ = 0, θ's bias = t). The logits become α tᵀ(W_φ xⱼ + b_φ) =
# w_kᵀxⱼ + const with **w_k = α W_φᵀ t**, the constant drops out of the softmax, and
#
# - every row is the same map αⱼ = softmax_j(w_kᵀxⱼ);
# - every y_i is the same vector, W_g c + b_g, with **c = Σⱼ αⱼ xⱼ**: one global context.
#
# That is GCNet's context step, exactly. GCNet then turns the linear bottleneck W_z W_g
# (C → C′ → C) into a transform of its own, W₂ ReLU(LN(W₁c + b₁)) + b₂, run once per
# image, and adds it to every position (or gates x with its sigmoid). Let us check the
# first part with nlref's own blocks.

# %%
cfg = nlref.NonLocalConfig(in_channels=16, inter_channels=8, scale=0.5, norm=None)
params = nlref.init_params(cfg, rng=0, scheme="random")
params["theta.weight"] = np.zeros_like(params["theta.weight"])  # θᵢ = b_θ = t for every i
x = rng.standard_normal((1, 16, 6, 7))
_, cache = nlref.forward(x, params, cfg)

gc_cfg = family.GCNetConfig(in_channels=16, inter_channels=4)
gc_params = family.init_params(gc_cfg, rng=0, scheme="random")
gc_params["mask.weight"] = cfg.scale * (params["phi.weight"].T @ params["theta.bias"])[None, :]
_, gc_cache = family.gcnet.forward(x, gc_params, gc_cfg)

rows = cache.attention[0]  # (N, N′): 42 rows
y = cache.values @ np.swapaxes(cache.attention, 1, 2)  # y = g Aᵀ, (1, C′, N)
c = gc_cache.global_context  # GCNet's c, (1, C, 1)
print("rows all equal GCNet's α:  ", np.abs(rows - gc_cache.attention[0]).max())
context = params["g.weight"] @ c + params["g.bias"][:, None]  # W_g c + b_g, (1, C′, 1)
print("y_i = W_g c + b_g for all i:", np.abs(y - context).max())

# %% [markdown]
# Both differences are rounding. GCNet's forward, as nlref writes it (the three steps of
# the paper: context, transform, fusion):

# %%
print(inspect.getsource(family.gcnet.forward))

# %% [markdown]
# ## DNL: the two terms inside the embedded Gaussian
#
# Write θ and φ as their means over the positions plus the rest: θᵢ = μ_θ + θ̂ᵢ,
# φⱼ = μ_φ + φ̂ⱼ. Then
#
# θᵢᵀφⱼ = θ̂ᵢᵀφ̂ⱼ + μ_θᵀφ̂ⱼ + (terms without j),
#
# and since e^(a+b) = e^a e^b, the embedded Gaussian's row is a renormalised product:
#
# softmax_j(α θᵢᵀφⱼ) = A_ij u_j / Σₖ A_ik u_k, with A_ij = softmax_j(α θ̂ᵢᵀφ̂ⱼ) (the
# **whitened pairwise** term) and u_j = softmax_j(α μ_θᵀφⱼ) (the **unary** term, one map
# for every query).
#
# Inside one softmax the two are entangled: a key that is salient for everyone (large
# u_j) and a key that resembles this query (large A_ij) both raise the same logit. The
# disentangled non-local block (Yin et al., 2020) computes them apart, each with its own
# softmax, and **adds** them: y_i = Σⱼ (A_ij + u_j) g_j. Its unary logits have a
# projection of their own, w_mᵀxⱼ + b_m. nlref's DNL with w_m = α W_φᵀμ_θ reproduces
# both factors of a given embedded Gaussian exactly:

# %%
dnl_cfg = family.DNLConfig(in_channels=16, inter_channels=8, scale=0.5, norm=None)
eg_params = nlref.init_params(cfg, rng=1, scheme="random")  # a plain embedded Gaussian
_, eg_cache = nlref.forward(x, eg_params, cfg)
theta = np.einsum("oc,bcn->bon", eg_params["theta.weight"], x.reshape(1, 16, -1))
mu_theta = theta.mean(axis=-1)[0] + eg_params["theta.bias"]
dnl_params = dict(eg_params)
dnl_params["mask.weight"] = dnl_cfg.scale * (eg_params["phi.weight"].T @ mu_theta)[None, :]
dnl_params["mask.bias"] = np.zeros(1)  # a constant logit: the softmax ignores it
dnl_params = {name: dnl_params[name] for name in family.param_shapes(dnl_cfg)}
_, dnl_cache = family.dnl.forward(x, dnl_params, dnl_cfg)

product = dnl_cache.attention * dnl_cache.unary_attention  # A_ij u_j
product /= product.sum(axis=-1, keepdims=True)
print("embedded Gaussian = normalised A·u:", np.abs(product - eg_cache.attention).max())

# %% [markdown]
# DNL's forward: the Non-local block's own steps (`embed`, `attend`, `project`,
# `normalise`), with the whitening between embed and attend, and the unary term beside:

# %%
print(inspect.getsource(family.dnl.forward))

# %% [markdown]
# ## GCNet's observation, measured
#
# GCNet's authors looked at trained Non-local blocks and found their attention maps
# nearly the same for every query: the block was computing one global context. Whether
# that happens depends on what the task needs. We train the toy model of notebook 04
# (stem, **Non-local block**, 1×1, mean, linear; everything in nlref, no autograd) on two
# tasks over the same kind of 12×12 images:
#
# - **count** (global context suffices): marker A and 3 distractors, 2 colours; label:
#   "do at least 2 of the 3 distractors have A's colour?". Every position needs the same
#   piece of information, A's colour, and the mean over the image does the counting.
# - **same colour** (notebook 04): markers A and B; label: "do A and B have the same
#   colour?". Here the markers can look at each other.
#
# `nlref.analysis.summarise` measures the trained block's attention on test images:
# each row's entropy (as a fraction of the uniform row's), and each row's Jensen–Shannon
# distance to the mean row; its mean over the queries is the **query dependence** (0: one
# map for every query). As in notebook 04, we also collapse the block to one map (W_θ = 0,
# θ's bias = the mean θ): by the derivation above, that *is* a GCNet context step, kept
# on the trained φ and g. If one global context suffices, the accuracy survives it.


# %%
def distractor_matches(batch: toy.ToyBatch) -> np.ndarray:
    """How many of the other coloured pixels have marker A's colour (B is not painted)."""
    colours = batch.x[:, 2:] > 0.5  # (B, K, S, S)
    b = np.arange(batch.x.shape[0])
    colours[b, :, batch.markers[:, 0, 0], batch.markers[:, 0, 1]] = False
    return colours[b, batch.colours[:, 0]].reshape(len(b), -1).sum(axis=1)


TASKS = {
    "count": (toy.ToyTask(colours=2, distractors=3), (True, False),
              lambda batch: (distractor_matches(batch) >= 2).astype(np.int64), 300),
    "same colour": (toy.ToyTask(), (True, True), lambda batch: batch.labels, 450),
}  # fmt: skip


def train(task, markers, label, steps, seed=0):
    """notebook 04's recipe: Adam, 64 fresh images a step, lr 0.01 with cosine decay."""
    model = toy.ToyModel("nonlocal", in_channels=task.in_channels)
    gen = np.random.default_rng(seed)
    params = toy.init_params(model, gen)
    state = optim.adam_init(toy.trainable(params))
    for step in range(steps):
        batch = toy.sample(task, 64, gen, markers=markers)
        _, grads, cache, _ = toy.loss_and_grads(params, batch.x, label(batch), model)
        lr = 0.005 * (1.0 + math.cos(math.pi * step / steps))
        params, state = optim.adam_step(toy.trainable(params), grads, state, lr=lr)
        params.update({f"nl.{n}": v for n, v in cache.middle.updated_buffers.items()})
    return model, params


def collapse(model, params, x):
    """The block with one query for every position: W_θ = 0, θ's bias = the mean θ."""
    h, _ = relu.forward(conv2d.forward(x, params["stem.weight"], params["stem.bias"])[0])
    mean_theta = params["nl.theta.weight"] @ h.mean(axis=(0, 2, 3)) + params["nl.theta.bias"]
    out = dict(params)
    out["nl.theta.weight"] = np.zeros_like(params["nl.theta.weight"])
    out["nl.theta.bias"] = mean_theta
    return out


results = {}
for name, (task, markers, label, steps) in TASKS.items():
    model, params = train(task, markers, label, steps)
    test = toy.sample(task, 500, rng=123, markers=markers)
    labels = label(test)
    _, cache = toy.forward(params, test.x[:200], model, training=False)
    summary = analysis.summarise(cache.middle)  # the block's attention, (200, 144, 144)
    flat = test.markers[:200, :, 0] * 12 + test.markers[:200, :, 1]  # (200, 2): A, B
    at = summary.distance[np.arange(200)[:, None], flat]  # each marker's distance
    results[name] = {
        "model": model, "params": params, "test": test,
        "accuracy": np.mean(toy.predict(params, test.x, model) == labels),
        "one map": np.mean(toy.predict(collapse(model, params, test.x), test.x, model) == labels),
        "query dependence": summary.query_dependence.mean(),
        "entropy": np.nanmean(summary.entropy),
        "entropy at A": summary.entropy[np.arange(200), flat[:, 0]].mean(),
        "at A": at[:, 0].mean(),
        "at B": at[:, 1].mean() if markers[1] else math.nan,
    }  # fmt: skip

print("                        all 144 queries            marker A           marker B")
print("task         accuracy  one map  query dep.  entropy  entropy  distance  distance")
for name, r in results.items():
    print(
        f"{name:<12} {r['accuracy']:8.1%} {r['one map']:8.1%} {r['query dependence']:11.4f}"
        f" {r['entropy']:8.3f} {r['entropy at A']:8.3f} {r['at A']:9.3f} {r['at B']:9.3f}"
    )

# %% [markdown]
# Read the table column by column:
#
# - **query dependence** is small for both blocks: averaged over all 144 queries, the
#   maps are nearly the same, GCNet's observation, on both tasks. Most queries are
#   background pixels that attend almost uniformly (row entropy ≈ 1 of uniform), and the
#   average hides the few rows where the attention does something.
# - **at the markers** the same-colour block's rows are sharper (lower entropy at A) and
#   a little farther from the mean map, at A and at B: the markers look for each other (notebook
#   04 shows which colours each one links). The count block's row at A is close to
#   uniform: it gathers the same average as everyone, which carries A's colour and the
#   colour counts.
# - **one map**: the decisive test. Collapsing the block to a single map (a GCNet
#   context step) costs the count task about a tenth of its accuracy, and the
#   same-colour task about a quarter: one global context nearly suffices for the first,
#   and clearly not for the second.
#
# The row of marker A (○) in a test image of each task, on a log scale (uniform is
# 1/144 ≈ 0.007):

# %%
fig = viz.new_figure(10.0, 4.4)
axes = fig.subplots(2, 2)
for (name, r), (ax_image, ax_row) in zip(results.items(), axes, strict=True):
    test, model = r["test"], r["model"]
    i = 0
    _, cache = toy.forward(r["params"], test.x[i : i + 1], model, training=False)
    (ra, ca) = test.markers[i, 0]
    row = nlref.to_numpy(cache.middle.attention_rows(ra * 12 + ca, ra * 12 + ca + 1))
    ax_image.imshow(figures.toy_image(test, i), interpolation="nearest")
    ax_image.set_title(f"{name}: input", fontsize=10)
    shown = ax_row.imshow(row.reshape(12, 12), cmap="inferno", norm=LogNorm(1e-4, 1.0))
    ax_row.set_title(f"{name}: row of marker A", fontsize=10)
    for ax in (ax_image, ax_row):
        ax.plot(ca, ra, "o", ms=11, mfc="none", mec="white", mew=1.6)
        if TASKS[name][1][1]:  # marker B is painted
            (rb, cb) = test.markers[i, 1]
            ax.plot(cb, rb, "s", ms=11, mfc="none", mec="#00e5ff", mew=1.6)
        ax.set_xticks([])
        ax.set_yticks([])
fig.colorbar(shown, ax=axes[:, 1].tolist(), shrink=0.85, label="attention (log scale)")
fig  # noqa: B018 (the cell shows its last value)

# %% [markdown]
# A check that the table says what the text claims (this notebook runs in the test suite):

# %%
count, same = results["count"], results["same colour"]
assert count["accuracy"] >= 0.95 and same["accuracy"] >= 0.95
assert count["query dependence"] < 0.05 and same["query dependence"] < 0.05
assert same["entropy at A"] < count["entropy at A"]  # A's row is sharper where A looks for B
assert same["accuracy"] - same["one map"] > count["accuracy"] - count["one map"] + 0.08

# %% [markdown]
# ## What DNL's whitening and unary term contribute, on a photo
#
# Back to the sample photo of notebook 03: colour + position features on a sphere, and
# the hand-set blocks of `nlref.demo.family`. With identity embeddings (θ = φ = g = x),
# the embedded Gaussian's row is softmax_j(α xᵢᵀxⱼ); DNL's whitened term compares the
# features after removing the mean feature μ, and its unary term, with w_m = α μ, is the
# factor the whitening took out. GCNet with w_k = α μ has that same map as its only one.

# %%
image = photo.load_image(photo.sample_photo_path())
small, factor = photo.downsample(photo.as_rgb(image), 40)
features = photo.pixel_features(small)
h, w = features.spatial
caches = demo_family.family_caches(features.x, scale=6.0)
eg = nlref.to_numpy(caches["embedded_gaussian"].attention)[0]  # (N, N)
pairwise = caches["dnl"].attention[0]
unary = caches["dnl"].unary_attention[0, 0]
print("GCNet's map is the unary map:", np.array_equal(caches["gcnet"].attention[0, 0], unary))
product = pairwise * unary
print("embedded Gaussian = normalised pairwise·unary:",
      np.abs(product / product.sum(-1, keepdims=True) - eg).max())  # fmt: skip
measures = {
    name: analysis.summarise(rows[None])
    for name, rows in (("embedded Gaussian", eg), ("DNL pairwise", pairwise))
}
for name, m in measures.items():
    print(f"{name:>18}: query dependence {m.query_dependence[0]:.3f}, "
          f"row entropy {np.nanmean(m.entropy):.3f} of uniform")  # fmt: skip
print(f"{'DNL unary':>18}: query dependence 0 (one map), entropy "
      f"{analysis.entropy_fraction(unary[None, None])[0, 0]:.3f} of uniform")  # fmt: skip

# %% [markdown]
# Three queries (cyan cross): on the face, on the flag, on the jacket. Each row: the
# embedded Gaussian's row, DNL's whitened pairwise row, and the unary map (the same in
# every row: it does not depend on the query). Log colour scale, per panel.

# %%
queries = {"face": (0.33, 0.5), "flag": (0.12, 0.1), "jacket": (0.8, 0.45)}
fig = viz.new_figure(10.5, 10.0)
axes = fig.subplots(3, 3)
for (where, (fy, fx)), axes_row in zip(queries.items(), axes, strict=True):
    qy, qx = int(fy * h), int(fx * w)
    i = qy * w + qx
    maps = {
        "embedded Gaussian": eg[i],
        "DNL pairwise (whitened)": pairwise[i],
        "DNL unary (every query)": unary,
    }
    for ax, (title, values) in zip(axes_row, maps.items(), strict=True):
        ax.imshow(small, interpolation="nearest")
        top = values.max()
        shown = ax.imshow(values.reshape(h, w), cmap="inferno", alpha=0.85,
                          norm=LogNorm(top * 1e-3, top))  # fmt: skip
        ax.plot(qx, qy, "+", ms=14, mew=2.5, color="#00e5ff")
        ax.set_title(f"{where}: {title}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(shown, ax=ax, shrink=0.7)
fig  # noqa: B018 (the cell shows its last value)

# %% [markdown]
# What each term contributes:
#
# - **The unary map** is a property of each key alone, the same for every query. Here μ
#   has one non-zero channel only (colour and position are centred; the sphere's lift
#   channel is not), so u favours the keys whose colour is closest to the image's average
#   and that lie near its centre: the mid-tones scattered over the photo.
# - **The whitened pairwise row** compares the centred features by their dot product.
#   Unlike the distance that the embedded Gaussian measures here (every x has the same
#   norm, notebook 03), a dot product also favours keys that lie far out along the
#   query's direction: the face query's row puts most of its weight on a few extreme keys,
#   and the rows are sharper than the embedded Gaussian's (the entropies above).
# - **The embedded Gaussian multiplies the two**: its face row is the pairwise
#   preference, spread over the face by the unary weight. Inside one softmax neither
#   factor can be set on its own. **DNL adds them**, each with its own softmax, so that
#   each is learned on its own: in the paper, the pairwise term learns relations within
#   a region and the unary term learns boundaries. GCNet keeps the unary term alone.
#
# The explorer shows the same three maps side by side for any query: move the pointer
# over the image (`nlref explore --sample --family dnl` writes this page to a file).

# %%
explore.from_family(image, "dnl", size=32)

# %% [markdown]
# ## Exercises
#
# 1. Make the Non-local block of the first section's check *almost* query-independent:
#    instead of W_θ = 0, scale W_θ by 0.1. How far are its rows from GCNet's α now
#    (`analysis.distance_to_mean` of its attention)?
# 2. Replace the toy model's block by a real GCNet: write `forward`/`backward` for stem,
#    `family.gcnet`, 1×1, mean, linear with the layers of `nlref.demo.layers` and
#    `nlref.layers`, and train it on both tasks. Which one does it solve?
# 3. DNL with a temperature: `family.DNLConfig(..., temperature=0.05)`, as
#    mmsegmentation's `DNLHead`. What does τ do to the pairwise rows' entropy on the photo?
# 4. The unary term with `sub_sample=(2, 2)`: the mask is pooled like φ and g
#    (`docs/conventions.md`). Why does mmsegmentation's own module fail there? Run
#    `nlref compare --layout dnl --sub-sample` and read the module error.
# 5. Check timm's ResNet-18 with `attn_layer="gca"` (GCNet's channel-add variant) with
#    `nlref.testing.check_model`, as `docs/oracle.md` does for `"gc"`.
