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
# # 02 · Deriving the backward pass, then checking it numerically
#
# **What you will learn**
#
# - how to derive a backward pass by hand, in index notation, for the three steps that
#   make the Non-local block: the weighted sum y = g Aᵀ, the softmax, and the bilinear
#   logits s = α θᵀφ;
# - how the block's backward runs the forward's steps in reverse, with the same step
#   functions as `nlref.backward`, and why x's gradient is a sum of four terms (x reaches
#   z along four paths);
# - how to *check* a backward pass with central differences (`nlref.gradcheck`), and what
#   a wrong one looks like when the check catches it.
#
# Notation: for any array v, v̄ = ∂L/∂v is the gradient of a scalar loss L, with v's
# shape. The chain rule in index form: if v reaches L only through u, then
# v̄ₖ = Σₘ ūₘ ∂uₘ/∂vₖ. The full derivations are in `docs/derivations.md`.

# %%
import inspect

import numpy as np

import nlref
from nlref import block
from nlref.layers import aggregate, softmax

rng = np.random.default_rng(0)
B, Cp, N, Nk = 2, 3, 5, 4  # batch, C', queries N, keys N'

# %% [markdown]
# ## 1. The weighted sum y = g Aᵀ
#
# Forward: $y_{c,i} = \sum_j A_{ij}\, g_{c,j}$ (per sample). Differentiate with respect to
# one entry of g and one of A:
#
# $$\frac{\partial y_{c,i}}{\partial g_{c',j}} = A_{ij}\,[c = c'],\qquad
#   \frac{\partial y_{c,i}}{\partial A_{i'j}} = g_{c,j}\,[i = i'].$$
#
# Plug into the chain rule and sum over what is left:
#
# $$\bar g_{c,j} = \sum_i \bar y_{c,i} A_{ij} \;(\bar g = \bar y A),\qquad
#   \bar A_{ij} = \sum_c \bar y_{c,i}\, g_{c,j} \;(\bar A = \bar y^\top g).$$
#
# That is what `nlref.layers.aggregate.backward` computes:

# %%
print(inspect.getsource(aggregate.backward))

# %% [markdown]
# Now check it. `nlref.gradcheck` takes a forward `inputs -> (out, cache)` and a backward
# `(dout, cache) -> {name: gradient}`, draws a random upstream gradient ō (never all
# ones, which hides transposition errors), and compares every gradient with the central
# difference (L(a + h e) − L(a − h e)) / 2h of L = ⟨ō, out⟩, entry by entry here.

# %%
inputs = {"A": rng.random((B, N, Nk)), "g": rng.standard_normal((B, Cp, Nk))}


def fwd(inp):
    return aggregate.forward(inp["A"], inp["g"])


def bwd(dy, cache):
    dA, dg = aggregate.backward(dy, cache)
    return {"A": dA, "g": dg}


print(nlref.gradcheck(fwd, bwd, inputs, mode="elementwise"))

# %% [markdown]
# ## 2. The softmax
#
# $P_{ij} = e^{s_{ij}} / \sum_k e^{s_{ik}}$ (row by row). Its derivative couples a whole
# row: $\partial P_{ij}/\partial s_{ik} = P_{ij}(\delta_{jk} - P_{ik})$. So
#
# $$\bar s_{ik} = \sum_j \bar P_{ij} P_{ij}(\delta_{jk} - P_{ik})
#              = P_{ik}\Big(\bar P_{ik} - \sum_j \bar P_{ij} P_{ij}\Big).$$
#
# No N×N′×N′ Jacobian is ever built: one row sum, one product.

# %%
print(inspect.getsource(softmax.backward))

s = rng.standard_normal((B, N, Nk))
result = nlref.gradcheck(
    lambda inp: softmax.forward(inp["s"]),
    lambda dp, cache: {"s": softmax.backward(dp, cache)},
    {"s": s},
    mode="jacobian",  # the full N·N′ × N·N′ Jacobian, both ways: small inputs only
)
print(result)

# %% [markdown]
# ## 3. The logits s = α θᵀφ, and a whole pairwise variant
#
# $s_{ij} = \alpha \sum_c \theta_{c,i}\phi_{c,j}$ is bilinear, so each factor's gradient
# is the other factor times s̄:
#
# $$\bar\theta = \alpha\,\phi\,\bar s^\top \quad (C', N),\qquad
#   \bar\phi = \alpha\,\theta\,\bar s \quad (C', N').$$
#
# The embedded Gaussian chains this with the softmax. Every variant in the registry has
# such a backward; check each one on its own, with its own parameters (the
# concatenation's w_f), in random directions:

# %%
theta = rng.standard_normal((B, Cp, N))
phi = rng.standard_normal((B, Cp, Nk))
for variant in nlref.pairwise.all_variants():
    extra = {n: rng.standard_normal(shape) for n, shape in variant.extra_params(Cp).items()}

    def fwd(inp, variant=variant):
        extra_in = {n: inp[n] for n in variant.extra_params(Cp)}
        return variant.forward(
            inp["theta"], inp["phi"], extra_in, 0.7 if variant.uses_scale else 1.0
        )

    def bwd(dA, cache, variant=variant):
        grads = variant.backward(dA, cache)
        return {"theta": grads.dtheta, "phi": grads.dphi, **grads.dextra}

    r = nlref.gradcheck(fwd, bwd, {"theta": theta, "phi": phi, **extra})
    errors = ", ".join(f"{n} {a.max_rel_err:.1e}" for n, a in r.args.items())
    print(f"{variant.name:<18} {'PASS' if r.ok else 'FAIL'}  max rel err: {errors}")

# %% [markdown]
# (The concatenation's ReLU has a kink at 0; random normal data lands on it with
# probability 0, and `nlref.draw_smooth_input` keeps block inputs at a distance from it.)
#
# ## 4. The whole block: the steps in reverse
#
# The forward runs six steps (notebook 01): embed, attend, aggregate, project out, batch
# norm, residual. The backward runs them in reverse, each with the backward of its layer,
# the ones derived above. This is `nlref.block.backward`, printed from its source:

# %%
print(inspect.getsource(block.backward))

# %% [markdown]
# x is used four times: as the queries θ = W_θ x, the keys φ = P(W_φ x), the values
# g = P(W_g x) and the residual z = … + x. The chain rule adds one term per use:
#
# $$\bar x = \bar x_\theta + \bar x_\phi + \bar x_g + \bar z,$$
#
# which is how the source above ends. Here are the same steps, one call each, with a
# switch to leave out some of the four paths:

# %%
cfg = nlref.NonLocalConfig(
    in_channels=4, inter_channels=3, pairwise="embedded_gaussian", sub_sample=(2, 2)
)
params, x = nlref.draw_smooth_case(cfg, (2, 4, 5, 6), rng=0)  # away from max-pool ties
z, cache = nlref.forward(x, params, cfg, training=True)


def backward_by_steps(dz, cache, paths=("residual", "theta", "phi", "g")):
    """nlref.block.backward one step at a time; x-bar sums only the given paths."""
    dz3 = dz.reshape(dz.shape[0], dz.shape[1], -1)  # (B, C, N)
    grads = {}
    dh = block.normalise_backward(dz3, cache.batch_norm, grads)  # 5. o = BN(h)
    dy = block.unproject("z", dh, cache.project_out, grads)  # 4. h = W_z y + b_z
    d_att, d_g = aggregate.backward(dy, cache.aggregate)  # 3. y = g A^T
    variant = nlref.pairwise.get(cache.cfg.pairwise)
    pair = variant.backward(d_att, cache.attend)  # 2. A = f(theta, phi) / C(x)
    grads.update(pair.dextra)
    embeds = (cache.embed_theta, cache.embed_phi, cache.embed_g)  # 1. theta, phi, g from x
    dx_theta, dx_phi, dx_g = block.embed_backward((pair.dtheta, pair.dphi, d_g), embeds, grads)
    terms = {"residual": dz3, "theta": dx_theta, "phi": dx_phi, "g": dx_g}
    dx = terms[paths[0]]
    for path in paths[1:]:
        dx = dx + terms[path]
    return dx.reshape(dz.shape), grads


dz = rng.standard_normal(z.shape)
dx_steps, grads_steps = backward_by_steps(dz, cache)
dx, grads = nlref.backward(dz, cache)
assert np.array_equal(dx_steps, dx)
assert all(np.array_equal(grads_steps[name], grads[name]) for name in grads)
print("step by step == nlref.backward, bit for bit:", ", ".join(grads))

# %% [markdown]
# Drop any one path and the gradient of x is wrong. `nlref.gradcheck` checks any
# forward/backward pair; here the forward is the whole block as a function of x:

# %%
every_path = ("residual", "theta", "phi", "g")
for dropped in (None, *every_path):
    kept = tuple(p for p in every_path if p != dropped)
    r = nlref.gradcheck(
        lambda inp: nlref.forward(inp["x"], params, cfg, training=True),
        lambda dz, cache, kept=kept: {"x": backward_by_steps(dz, cache, kept)[0]},
        {"x": x},
        raise_on_failure=False,
    )
    status = "PASS" if r.ok else "FAIL"
    print(f"without {dropped or 'nothing':<9} {status}  max rel err {r.args['x'].max_rel_err:.1e}")

# %% [markdown]
# `nlref.gradcheck_block` checks x and every parameter of a block; `draw_smooth_case`
# keeps x away from max-pool ties, where the finite differences would straddle a kink.
# Every variant:

# %%
for name in nlref.pairwise.names():
    cfg = nlref.NonLocalConfig(in_channels=4, inter_channels=3, pairwise=name, sub_sample=(2, 2))
    params, x = nlref.draw_smooth_case(cfg, (2, 4, 5, 6), rng=0)
    r = nlref.gradcheck_block(cfg, x, params)
    worst = max(r.args.values(), key=lambda a: a.max_rel_err)
    print(
        f"{name:<18} {'PASS' if r.ok else 'FAIL'}  {len(r.args)} tensors, "
        f"worst max rel err {worst.max_rel_err:.1e} ({worst.name})"
    )

# %% [markdown]
# ## 5. What a wrong backward looks like
#
# A classic slip: keeping only the diagonal of the softmax's Jacobian,
# s̄ = P ⊙ P̄, and forgetting the row sum. Shapes still match and the numbers look
# plausible; the check names the argument, the size of the error and where it is.


# %%
def wrong_softmax_backward(dp, cache):
    return {"s": cache.weights * dp}  # missing: - P * sum_j(dP * P)


wrong = nlref.gradcheck(
    lambda inp: softmax.forward(inp["s"]),
    wrong_softmax_backward,
    {"s": s},
    mode="elementwise",
    raise_on_failure=False,
)
print(wrong)
assert not wrong.ok

# %% [markdown]
# ## Exercises
#
# 1. Derive the backward of the dot-product variant, A = α θᵀφ / N′, and compare your
#    formula with `nlref/pairwise/dot_product.py`.
# 2. Derive batch norm's training-mode backward (the mean and variance depend on every
#    entry of a channel). Check your derivation against `docs/derivations.md`, then
#    against `nlref.gradcheck` on `nlref.layers.batchnorm`.
# 3. In section 4, gradient-check with `mode="elementwise"` instead: how much slower is
#    it, and why does the default use random directions?
# 4. In section 4, `gradcheck` the parameters too: add `params` to the inputs of the
#    check and return `grads` from `backward_by_steps`. Then drop the `grads.update(...)`
#    line with the concatenation variant: which argument does the check name?
# 5. Which gradients does `gradcheck_block` report as (nearly) zero for the embedded
#    Gaussian with batch norm in training mode, and why (`docs/derivations.md`,
#    section 8)? Do they stay zero in evaluation mode (`training=False`)?
