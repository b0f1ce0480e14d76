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
# # 03 · Attention maps on a real photo and a short clip
#
# **What you will learn**
#
# - how to read one row of the attention, Aᵢ,: = f(xᵢ, ·)/C(x), as a picture of where
#   query pixel i looks;
# - that the Gaussian f = exp(α xᵢᵀxⱼ) on simple per-pixel features (colour and
#   position) makes a pixel attend to *similar* pixels, however far away: the
#   "non-local" in the name;
# - why the features are put on a sphere first, and what α and the position weight do;
# - how the four pairwise functions differ on the same query, and how a query in one frame
#   of a clip attends across time (the paper's space-time attention);
# - how to explore every query interactively: the notebook ends with the attention
#   explorer, which shows the map of whatever pixel the pointer is on.
#
# Nothing is trained here: the weights are set by hand so that the maps have a meaning.
# Notebook 04 learns them.

# %%
# %matplotlib inline
import numpy as np

import nlref
from nlref import viz
from nlref.demo import photo

# %% [markdown]
# ## The photo and its features
#
# matplotlib ships a photo of Grace Hopper in its sample data, so this works offline. We
# average it down to a grid of at most 48 cells a side (N = 1794 positions, an attention
# matrix of 3.2 million entries: fine for NumPy), then describe each cell by its colour
# and its position.

# %%
image = photo.load_image(photo.sample_photo_path())
small, factor = photo.downsample(image, 48)
feats = photo.pixel_features(small, position_weight=0.25)
h, w = feats.spatial
shown = image[: h * factor, : w * factor]  # the pixels the grid covers
print(f"photo {image.shape} -> grid {small.shape[:2]} ({factor}x{factor} pixels a cell)")
print(f"x {feats.x.shape} = (B, C, h, w), channels {feats.channels}")

# %% [markdown]
# **Why a sphere.** The Gaussian's logits are xᵢᵀxⱼ, and
# xᵢᵀxⱼ = ½(‖xᵢ‖² + ‖xⱼ‖² − ‖xᵢ − xⱼ‖²). The ‖xᵢ‖² term is the same for every key and
# cancels in the softmax; the ‖xⱼ‖² term does not, and would make bright pixels (large
# norm) win every row. `pixel_features` appends one channel √(R² − ‖uⱼ‖²) so that every
# ‖xⱼ‖ = R: the attention is then softmaxⱼ(−α‖xᵢ − xⱼ‖²/2), a function of distance only.

# %%
norms = np.linalg.norm(feats.x.reshape(feats.x.shape[1], -1), axis=0)
print(f"every |x_j| is R: min {norms.min():.6f}, max {norms.max():.6f}")

# %% [markdown]
# ## The Gaussian, through `nlref.forward`
#
# A block with the Gaussian pairwise function has no θ/φ weights: it compares x itself.
# `hand_set_params` fills in g = identity and W_z = 0 (we only look at the attention).

# %%
cfg = nlref.NonLocalConfig(
    in_channels=feats.x.shape[1],
    inter_channels=feats.x.shape[1],
    pairwise="gaussian",
    scale=6.0,
    norm=None,
    biases=(),
)
params = photo.hand_set_params(cfg, xp=np)
z, cache = nlref.forward(feats.x, params, cfg, training=False)
print("attention", cache.attention.shape, "rows sum to", cache.attention[0].sum(axis=1)[:3])

# %%
queries = [(int(0.17 * h), w // 2), (int(0.45 * h), w // 2), (int(0.9 * h), int(0.2 * w))]
viz.plot_attention_2d(shown, cache, queries)

# %% [markdown]
# Each title gives the query in the photo's pixels (the centre of its grid cell) and the
# cell; each panel has its own colour bar, from 0 to that map's maximum. `cache` itself is
# enough: `viz` reads the rows it needs with `cache.attention_rows`, which also works when
# the attention is too large to be held and `nlref.forward` evaluated it in tiles.
#
# The query on the cap (left) lights up the cap *and* the uniform, which have the same dark
# navy: far apart, similar colour. The query on the face attends to skin, wherever it is.
# That is what "non-local" means: a convolution at the cap would only see the cap.
#
# ## What α and the position weight do
#
# α (`cfg.scale`) is an inverse temperature: small α spreads the attention, large α
# concentrates it on the closest matches. The position weight trades colour against
# distance: at 0 the map ignores where a pixel is; large, it becomes a local blur.


# %%
def gaussian_attention(x, scale):
    return photo.attention_by_variant(x, variants=["gaussian"], scale=scale)["gaussian"]


query = queries[0]
maps = {f"α = {a:g}": gaussian_attention(feats.x, a) for a in (1.0, 6.0, 30.0)}
for pw in (0.0, 2.0):
    xpw = photo.pixel_features(small, position_weight=pw).x
    maps[f"α = 6, position weight {pw:g}"] = gaussian_attention(xpw, 6.0)
fig = viz.plot_pairwise_comparison(
    shown, maps, query, spatial=feats.spatial, suptitle="temperature and locality"
)
fig  # noqa: B018 (the cell shows its last value)

# %% [markdown]
# ## The four pairwise functions, one query
#
# Same features, same hand-set weights (θ = φ = g = identity; for the concatenation
# w_θ = w_φ = the brightness direction):
#
# - the embedded Gaussian with identity embeddings *is* the Gaussian: training (notebook
#   04) changes W_θ and W_φ, i.e. what "similar" means;
# - the dot product α xᵢᵀxⱼ / N′ has no exponential: it barely separates good matches from
#   fair ones, and it can be negative;
# - the concatenation ReLU(w_θᵀxᵢ + w_φᵀxⱼ)/N′ is a query term plus a key term: it ranks the
#   keys the same way for every query (here: by brightness), whatever the query looks like.

# %%
attentions = photo.attention_by_variant(feats.x, scale=6.0)
viz.plot_pairwise_comparison(shown, attentions, query, spatial=feats.spatial)

# %% [markdown]
# Subsampling the keys (the paper's max-pool after φ and g) makes N′ four times smaller;
# the map keeps its shape at a coarser resolution. Each pooled key covers its 2×2 window of
# cells (the figure says the keys are pooled; max-pooling drops a last odd row or column,
# so the map may stop one cell short of the edge):

# %%
pooled = photo.attention_by_variant(feats.x, variants=["gaussian"], scale=6.0, sub_sample=(2, 2))
print("keys pooled 2x2:", pooled["gaussian"].shape)
viz.plot_attention_2d(shown, pooled["gaussian"], [query], spatial=feats.spatial, show_image=False)

# %% [markdown]
# ## A short clip: attention across space and time
#
# The block works on T×H×W as well (N = T·H·W). A synthetic clip: a red ball crosses a
# textured background with two static yellow squares. The features now include the frame
# index as a position. A query on the ball in one frame attends to the ball in *every*
# frame: the block links an object through time without any motion model.

# %%
clip, centres = photo.synthetic_clip(frames=6, size=24)
clip_feats = photo.pixel_features(clip, position_weight=0.25)
clip_att = photo.attention_by_variant(clip_feats.x, variants=["gaussian"], scale=6.0)["gaussian"]
t = 2
print(f"clip {clip.shape}, x {clip_feats.x.shape}, attention {clip_att.shape}")
viz.plot_attention_clip(clip, clip_att, (t, *centres[t]))

# %% [markdown]
# How much of the query's attention lands on the ball, frame by frame?

# %%
row = viz.attention_row(clip_att, (t, *centres[t]), clip_feats.spatial)  # (T, H, W)
ball = np.all(np.abs(clip - np.array([0.9, 0.1, 0.1])) < 1e-6, axis=-1)  # (T, H, W)
for frame in range(clip.shape[0]):
    print(f"frame {frame}: {row[frame][ball[frame]].sum():.3f} of the attention on the ball")
print(f"total on the ball: {row[ball].sum():.3f} (the ball covers {ball.mean():.1%} of the clip)")

# %% [markdown]
# ## The whole matrix, for a tiny input
#
# For a 10-cell version of the photo every row can be shown at once: N × N′ with the keys
# pooled 2×2.

# %%
tiny, _ = photo.downsample(image, 10)
tiny_att = photo.attention_by_variant(
    photo.pixel_features(tiny).x, variants=["embedded_gaussian"], scale=2.0, sub_sample=(2, 2)
)["embedded_gaussian"]
viz.plot_attention_matrix(tiny_att, size=4.5)

# %% [markdown]
# ## Every query at once: the attention explorer
#
# A few chosen queries tell only part of the story. `viz.explore` takes any attention, or
# forward caches, and the picture, and returns an explorer that the notebook shows inline:
# **move the pointer over the photo** to see where that pixel attends, switch between the
# pairwise functions, and read the row's entropy, its top keys and how far its map is from
# the average map in the side panel. `.save("explorer.html")` writes it as one file that
# opens in any browser with no network; `nlref explore my.jpg` does the same from the
# command line (`nlref.explore.from_torch` builds one from a PyTorch block inside a model).
#
# Here: the four pairwise functions with the keys pooled 2×2 (a smaller page).

# %%
caches = photo.block_caches(feats.x, scale=6.0, sub_sample=(2, 2))
page = viz.explore(shown, caches, title="hand-set block on the photo, keys pooled 2×2")
print(f"{page.nbytes / 2**20:.1f} MiB; query dependence:", page.query_dependence)
page  # noqa: B018 (the cell shows its last value)

# %% [markdown]
# ## Exercises
#
# 1. Try your own image from the command line:
#    `nlref attention my.jpg --query 120,200 --pairwise all --out cmp.png`, and
#    `nlref explore my.jpg --out explorer.html` to explore every pixel.
# 2. Drop the sphere lift: build x from the colour and position channels only
#    (`feats.x[:, :-1]`) and compare the maps. Which pixels now win every row, and why?
# 3. Find α for which a query on the cap attends mostly to the cap alone, not the uniform.
# 4. In the clip, set `position_weight=2.0`. How far in time does the query still see the
#    ball? Relate it to the frame index being one of the position channels.
