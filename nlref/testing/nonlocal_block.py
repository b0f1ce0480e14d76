"""The Non-local block as a family of the oracle (:mod:`nlref.testing.families`).

- :func:`reference`: nlref's forward and hand-derived backward, as the report's tensors;
- :func:`emulate`: the same, rounded to float16 or bfloat16 after every step;
- :func:`conventions`: what the diagnosis varies: the logit scale (1, 1/√C′, 1/√C, or a
  ratio fitted to the module), the pool kernel and order, BN's mode, each bias, the
  embedded Gaussian vs the dot product (same weights), and the concatenation's 1/N′.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from .. import api, block
from ..config import NonLocalConfig
from ..layers import aggregate, maxpool, softmax
from ..pairwise import get as get_pairwise
from ..params import param_shapes
from ..presets import PRESETS
from .diagnosis import Change, Context, State
from .families import Family, Probe, in_backward_order, register_family
from .precision import round_to

__all__ = ["FAMILY", "bn_mode_change", "conventions", "emulate", "reference"]


def _tensors(
    cfg: NonLocalConfig,
    values: Any,
    attention: Any,
    z: Any,
    updated: Mapping[str, Any],
    grads: Mapping,
    dx: Any,
) -> dict[str, np.ndarray]:
    out = {"g": values, "attention": attention, "z": z}
    out.update(updated)
    out.update(in_backward_order(grads, param_shapes(cfg)))
    if dx is not None:
        out["dx"] = dx
    return {k: np.asarray(v) for k, v in out.items()}


def reference(
    cfg: NonLocalConfig,
    params: Mapping[str, np.ndarray],
    x: np.ndarray,
    dz: np.ndarray,
    training: bool,
    backward: bool = True,
) -> dict[str, np.ndarray]:
    """nlref's tensors for the oracle, in the dtype of x: the values g, the attention, z,
    then (with ``backward``) the updated BN statistics, every parameter gradient in the
    order backward reaches it, and dx."""
    z, cache = api.forward(x, params, cfg, training=training)
    attention = cache.attention_rows(0, math.prod(x.shape[2:]))
    if not backward:
        return _tensors(cfg, cache.values, attention, z, {}, {}, None)
    dx, grads = api.backward(dz, cache)
    return _tensors(cfg, cache.values, attention, z, cache.updated_buffers, grads, dx)


def _embed_rounded(
    x: np.ndarray, p: Mapping[str, np.ndarray], cfg: NonLocalConfig, spatial: tuple, r: Any
) -> tuple[Any, Any, Any, tuple[block.EmbedCache, ...]]:
    """:func:`nlref.block.embed`, step for step, with each projection's output rounded
    before it is pooled: a max-pool then sees the ties that rounding makes, as a
    low-precision module does (and routes its gradient to the first of them)."""
    kernel = cfg.sub_sample
    pool_first = kernel is not None and cfg.pool_order == "before_projection"
    if kernel is not None and (pool_first or not get_pairwise(cfg.pairwise).embeds):
        pooled_x, pool_x = maxpool.forward_flat(x, kernel, spatial)

    def key_side(layer: str) -> tuple[Any, block.EmbedCache]:  # φ or g
        if pool_first:
            u, proj = block.project(layer, pooled_x, p)
            return r(u), block.EmbedCache(pool_before=pool_x, projected=proj)
        u, proj = block.project(layer, x, p)
        if kernel is None:
            return r(u), block.EmbedCache(projected=proj)
        v, pool = maxpool.forward_flat(r(u), kernel, spatial)
        return v, block.EmbedCache(projected=proj, pool_after=pool)

    if get_pairwise(cfg.pairwise).embeds:
        theta, theta_proj = block.project("theta", x, p)
        theta, theta_cache = r(theta), block.EmbedCache(projected=theta_proj)
        phi, phi_cache = key_side("phi")
    elif kernel is None:  # the Gaussian: θ = x, φ = P(x)
        theta, theta_cache, phi, phi_cache = x, block.EmbedCache(), x, block.EmbedCache()
    else:
        theta, theta_cache = x, block.EmbedCache()
        phi, phi_cache = pooled_x, block.EmbedCache(pool_before=pool_x)
    g, g_cache = key_side("g")
    return theta, phi, g, (theta_cache, phi_cache, g_cache)


def emulate(
    cfg: NonLocalConfig,
    params: Mapping[str, np.ndarray],
    x: np.ndarray,
    dz: np.ndarray,
    training: bool,
    fmt: str,
) -> dict[str, np.ndarray]:
    """:func:`reference` with every step's output rounded to ``fmt`` (float16, bfloat16).

    Each step of :mod:`nlref.block` runs in float32 on inputs already in ``fmt``, so its
    sums accumulate in float32, and its outputs are rounded to ``fmt`` before the next step
    reads them; a softmax variant's logits are rounded before the softmax.
    """

    def r(a: Any) -> np.ndarray:
        return round_to(a, fmt)

    p = {k: r(v) for k, v in params.items()}
    b, c, *spatial = x.shape
    n = math.prod(spatial)
    x_flat = r(x).reshape(b, c, n)
    # the forward, step by step (nlref.block.forward), rounding between steps
    theta, phi, g, embed_caches = _embed_rounded(x_flat, p, cfg, tuple(spatial), r)
    variant = get_pairwise(cfg.pairwise)
    extra = {name: p[name] for name in variant.extra_params(cfg.inter_channels)}
    if variant.softmax:  # the logits are a tensor of their own
        s, logits_cache = variant.logits.forward(theta, phi, extra, cfg.effective_scale)
        attention, softmax_cache = softmax.forward(r(s))
    else:
        attention, attend_cache = variant.forward(theta, phi, extra, cfg.effective_scale)
    attention = r(attention)
    y, aggregate_cache = aggregate.forward(attention, g)
    h, project_cache = block.project("z", r(y), p)
    o, bn_cache, updated = block.normalise(r(h), p, cfg, training)
    z = r(r(o) + x_flat)
    # the backward, step by step (nlref.block.backward)
    grads: dict[str, Any] = {}
    dz_flat = r(dz).reshape(b, c, n)
    dh = r(block.normalise_backward(dz_flat, bn_cache, grads))
    dy = r(block.unproject("z", dh, project_cache, grads))
    dattention, dg = aggregate.backward(dy, aggregate_cache)
    dattention, dg = r(dattention), r(dg)
    if variant.softmax:
        ds = r(softmax.backward(dattention, softmax_cache))
        pair_grads = variant.logits.backward(ds, logits_cache)
    else:
        pair_grads = variant.backward(dattention, attend_cache)
    grads.update(pair_grads.dextra)
    d_paths = (r(pair_grads.dtheta), r(pair_grads.dphi), dg)
    dx_theta, dx_phi, dx_g = block.embed_backward(d_paths, embed_caches, grads)
    dx = r(dz_flat + dx_theta + dx_phi + dx_g)  # accumulated in float32, stored once
    grads = {k: r(v) for k, v in grads.items()}
    updated = {k: r(v) for k, v in updated.items()}
    out = _tensors(cfg, g, attention, z.reshape(x.shape), updated, grads, dx.reshape(x.shape))
    return {k: v.astype(np.float64) for k, v in out.items()}


# --------------------------------------------------------------------------- the module


def _read(module: Any, layout: Any, overrides: Mapping[str, Any]) -> tuple[Any, dict]:
    """The module's config and float64 parameters, through its layout (any family)."""
    from ..interop.torch import from_torch

    return from_torch(module, layout=layout, dtype="float64", **overrides)


def _keys(layout: Any, cfg: Any) -> dict[str, str]:
    """nlref name -> the module's state_dict key (any family)."""
    from ..interop.torch import key_map

    return key_map(layout, cfg)


def _fill(template: str, module: Any) -> str:
    """``"{mode}"`` -> the module's ``mode`` attribute."""
    return re.sub(r"\{(\w+)\}", lambda m: str(getattr(module, m.group(1))), template)


def _accepts(fn: Any, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _probes(layout: Any, module: Any, cfg: NonLocalConfig) -> list[Probe]:
    from ..interop.torch import module_paths

    paths = module_paths(module, layout)
    cls = type(module).__name__
    linear = layout.kind == "linear"
    probes = [
        Probe(
            "g",
            target=paths["values"],
            channels_last=linear,
            why_not="the layout names no sub-module whose output is g after its pool "
            "(Layout(values=...))",
        )
    ]
    if layout.attention is not None:
        probes.append(Probe("attention", target=_fill(layout.attention, module)))
    elif layout.attention_kwarg is not None and _accepts(module.forward, layout.attention_kwarg):
        probes.append(Probe("attention", kwarg=layout.attention_kwarg))
    else:
        probes.append(Probe("attention", why_not=f"not exposed by {cls} (computed inside forward)"))
    return probes


def _summary(cfg: NonLocalConfig) -> str:
    pool = "off" if cfg.sub_sample is None else f"{cfg.sub_sample} {cfg.pool_order}"
    scale = "None" if cfg.scale is None else f"{cfg.scale:.6g}"
    return (
        f"config: pairwise={cfg.pairwise}, C={cfg.in_channels}, C′={cfg.inter_channels}, "
        f"scale={scale}, sub_sample={pool}, norm={cfg.norm}, "
        f"biases={','.join(cfg.biases) or 'none'}"
    )


# --------------------------------------------------------------------------- diagnosis


def _names(names: list[str]) -> str:
    if not names:
        return ""
    owners = [f"{n}'s" for n in names]
    text = owners[0] if len(owners) == 1 else ", ".join(owners[:-1]) + " and " + owners[-1]
    return f"{text} convention"


def _scale_presets(pairwise: str, c: int, ci: int, value: float | None) -> list[str]:
    v = 1.0 if value is None else value
    return [
        p.name
        for p in PRESETS.values()
        if pairwise in p.pairwise and math.isclose(p.scale(pairwise, c, ci) or 1.0, v, rel_tol=1e-9)
    ]


def _scale_text(cfg: NonLocalConfig) -> str:
    v, c, ci = cfg.scale, cfg.in_channels, cfg.inter_channels
    if v is None or math.isclose(v, 1.0, rel_tol=1e-9):
        return "1 (no scale)"
    if math.isclose(v, ci**-0.5, rel_tol=1e-9):
        return f"1/√C′ = {v:.3g}"
    if math.isclose(v, c**-0.5, rel_tol=1e-9):
        return f"1/√C = {v:.3g}"
    return f"{v:.4g}"


def _fit_scale(state: State, context: Context) -> float | None:
    """The scale under which nlref's forward tensors best fit the module's (Gauss-Newton
    on the residual, from the best of a coarse grid), or None when nothing is to fit."""
    names = [n for n in context.forward_names if n in context.got and n != "g"]
    if not names or not get_pairwise(state.cfg.pairwise).uses_scale:
        return None
    target = np.concatenate([np.ravel(context.got[n]) for n in names])

    def f(s: float) -> np.ndarray:
        out = context.run(state.with_(cfg=replace(state.cfg, scale=s)), False)
        return np.concatenate([np.ravel(out[n]) for n in names])

    s0 = state.cfg.effective_scale
    try:
        if f(s0).shape != target.shape:
            return None  # another change (a pool kernel) gave other shapes
    except ValueError:
        return None
    grid = [s0 * 2.0**k for k in range(-6, 7)]  # 1/64 to 64 times nlref's scale
    s = min(grid, key=lambda v: float(np.sum((target - f(v)) ** 2)))
    for _ in range(8):  # Gauss-Newton: converges fast from a grid point within √2
        fs = f(s)
        h = 1e-7 * s
        jac = (f(s + h) - fs) / h
        denom = float(jac @ jac)
        if denom == 0.0:
            return None
        step = float(jac @ (target - fs)) / denom
        s_next = s + step if s + step > 0 else s / 2
        done = abs(s_next - s) <= 1e-13 * s
        s = s_next
        if done:
            break
    return s


def bn_mode_change() -> Change:
    """Batch norm in the other mode: training (batch statistics) or eval (running ones)."""

    def flip_bn(state: State, context: Context) -> State:
        frozen = {k: state.params[k] for k in ("bn.running_mean", "bn.running_var")}

        def keep_stats(want: dict) -> dict:  # eval mode leaves the statistics alone
            return {**frozen, **want}

        return state.with_(training=not state.training, adjust=(*state.adjust, keep_stats))

    def bn_text(a: State, b: State) -> str:
        mode = {
            True: "training mode (batch statistics)",
            False: "eval mode (running statistics, as a frozen BN: norm_eval=True)",
        }
        return (
            f"batch norm: the module behaves as in {mode[b.training]}, nlref used "
            f"{mode[a.training]}"
        )

    return Change("bn", flip_bn, bn_text, lambda b: {"training": b.training})


def conventions(cfg: NonLocalConfig, training: bool, x_shape: tuple[int, ...]) -> list[Change]:
    """The changes the diagnosis tries for a Non-local block read as ``cfg``."""
    dims = len(x_shape) - 2
    spatial = tuple(x_shape[2:])
    c, ci = cfg.in_channels, cfg.inter_channels
    variant = get_pairwise(cfg.pairwise)
    changes: list[Change] = []

    def n_keys(state: State) -> int:
        return math.prod(state.cfg.key_shape(spatial))

    def with_cfg(state: State, **fields: Any) -> State | None:
        try:
            new = replace(state.cfg, **fields)
        except (ValueError, TypeError):
            return None
        if any(k < 1 for k in new.key_shape(spatial)):
            return None
        return state.with_(cfg=new)

    # the embedded Gaussian and the dot product have the same weights
    if cfg.pairwise in ("embedded_gaussian", "dot_product"):
        other = "dot_product" if cfg.pairwise == "embedded_gaussian" else "embedded_gaussian"
        words = {
            "dot_product": "dot_product (θᵢᵀφⱼ / N′, no softmax)",
            "embedded_gaussian": "embedded_gaussian (softmax of θᵢᵀφⱼ)",
        }

        def switch(state: State, context: Context, other: str = other) -> State | None:
            scale = None if other == "dot_product" else state.cfg.scale
            return with_cfg(state, pairwise=other, scale=scale)

        changes.append(
            Change(
                "pairwise",
                switch,
                lambda a, b: (
                    f"pairwise: the module behaves as {words[b.cfg.pairwise]}, nlref "
                    f"used {words[a.cfg.pairwise]}"
                ),
                lambda b: {"pairwise": b.cfg.pairwise, "scale": b.cfg.scale},
            )
        )

    # the pool kernel (or none)
    kernels: list[tuple[int, ...] | None] = [None, (2,) * dims]
    if dims == 3:
        kernels.append((1, 2, 2))
    for kernel in dict.fromkeys(kernels):
        if kernel == cfg.sub_sample:
            continue

        def pool(state: State, context: Context, kernel: Any = kernel) -> State | None:
            return with_cfg(state, sub_sample=kernel)

        def pool_text(a: State, b: State) -> str:
            def text(k: Any) -> str:
                if k is None:
                    return "no pooling"
                owners = [p.name for p in PRESETS.values() if p.kernels.get(dims) == tuple(k)]
                note = _names(owners)
                return f"a max-pool of kernel {tuple(k)}" + (f" ({note})" if note else "")

            return (
                f"pool kernel: the module behaves as {text(b.cfg.sub_sample)}, nlref used "
                f"{text(a.cfg.sub_sample)}"
            )

        changes.append(
            Change("pool kernel", pool, pool_text, lambda b: {"sub_sample": b.cfg.sub_sample})
        )

    # the pool order
    if variant.embeds:

        def order(state: State, context: Context) -> State | None:
            if state.cfg.sub_sample is None:
                return None
            flip = {
                "after_projection": "before_projection",
                "before_projection": "after_projection",
            }
            return with_cfg(state, pool_order=flip[state.cfg.pool_order])

        def order_text(a: State, b: State) -> str:
            def text(o: str) -> str:
                owners = [p.name for p in PRESETS.values() if p.kernels and p.pool_order == o]
                where = (
                    "x before the φ and g projections"
                    if o.startswith("before")
                    else ("the φ and g projections' outputs")
                )
                return f"{o} (pooling {where}; {_names(owners)})"

            return (
                f"pool order: the module behaves as {text(b.cfg.pool_order)}, nlref used "
                f"{text(a.cfg.pool_order)}"
            )

        changes.append(
            Change("pool order", order, order_text, lambda b: {"pool_order": b.cfg.pool_order})
        )

    # the logit scale: 1, 1/√C′, 1/√C, or the ratio fitted to the module
    if variant.uses_scale or cfg.pairwise in ("embedded_gaussian", "dot_product"):
        named = (None, ci**-0.5, c**-0.5)

        def scale_text(a: State, b: State) -> str:
            value = _scale_text(b.cfg)
            notes = [_names(_scale_presets(b.cfg.pairwise, c, ci, b.cfg.scale))]
            if "=" not in value and "no scale" not in value:  # a fitted value
                ratio = b.cfg.effective_scale / a.cfg.effective_scale
                nk, nq = n_keys(b), math.prod(spatial)
                plain = not get_pairwise(b.cfg.pairwise).softmax  # divided by N′
                notes = [f"= {ratio:.4g} × nlref's"]
                if plain and math.isclose(ratio, nk, rel_tol=1e-6):
                    notes.append(f"as if it did not divide by N′ = {nk}")
                elif plain and math.isclose(ratio, nk / nq, rel_tol=1e-6):
                    notes.append(f"as if it divided by N = {nq} (the queries), not N′ = {nk}")
            if value.endswith(" (no scale)"):
                value, notes = "1", ["no scale", *notes]
            notes = [n for n in notes if n]
            return (
                f"scale: the module behaves as {value}"
                + (f" ({'; '.join(notes)})" if notes else "")
                + f", nlref used {_scale_text(a.cfg)}"
            )

        for value in named:
            if math.isclose(value or 1.0, cfg.effective_scale, rel_tol=1e-9):
                continue

            def set_scale(state: State, context: Context, value: Any = value) -> State | None:
                if not get_pairwise(state.cfg.pairwise).uses_scale:
                    return None
                return with_cfg(state, scale=value)

            changes.append(Change("scale", set_scale, scale_text, lambda b: {"scale": b.cfg.scale}))

        def fitted(state: State, context: Context) -> State | None:
            s = _fit_scale(state, context)
            if s is None:
                return None
            close = (state.cfg.effective_scale, *(v or 1.0 for v in named))
            if any(math.isclose(s, v, rel_tol=1e-6) for v in close):
                return None  # no change, or a named value (tried on its own)
            return with_cfg(state, scale=s)

        changes.append(
            Change("scale", fitted, scale_text, lambda b: {"scale": b.cfg.scale}, fallback=True)
        )

    # each bias present or absent
    for layer in cfg.biases:
        key = f"{layer}.bias"

        def drop(state: State, context: Context, key: str = key) -> State | None:
            params = dict(state.params)
            params[key] = np.zeros_like(params[key])

            def no_grad(want: dict, key: str = key) -> dict:
                return {**want, key: np.zeros_like(want[key])}

            return state.with_(params=params, adjust=(*state.adjust, no_grad))

        def drop_text(a: State, b: State, layer: str = layer) -> str:
            owners = [p.name for p in PRESETS.values() if layer not in p.biases(a.cfg.norm)]
            note = _names(owners)
            return (
                f"{layer} bias: the module behaves as having none (it holds one it does not "
                f"add{'; ' + note if note else ''}), nlref added it"
            )

        changes.append(Change(f"bias {layer}", drop, drop_text))

    # batch norm in training or eval mode
    if cfg.norm is not None:
        changes.append(bn_mode_change())

    # the concatenation's 1/N′: ReLU(w·u) = ReLU((N′w)·u) / N′
    if cfg.pairwise == "concatenation":

        def undivided(state: State, context: Context) -> State:
            nk = n_keys(state)
            params = dict(state.params)
            params["concat.weight"] = params["concat.weight"] * nk

            def grad(want: dict) -> dict:
                return {**want, "concat.weight": want["concat.weight"] * nk}

            return state.with_(params=params, adjust=(*state.adjust, grad))

        changes.append(
            Change(
                "concat",
                undivided,
                lambda a, b: (
                    f"concatenation's 1/N′: the module behaves as not dividing by "
                    f"N′ = {n_keys(b)}, nlref divides (as every implementation does)"
                ),
            )
        )
    return changes


def _terms(cfg: NonLocalConfig, x_shape: tuple[int, ...]) -> dict[str, int]:
    """Every parameter gradient sums over the batch and the N positions."""
    from ..params import trainable_names

    k = x_shape[0] * math.prod(x_shape[2:])
    return {name: k for name in trainable_names(cfg)}


FAMILY = register_family(
    Family(
        name="nonlocal",
        read=_read,
        reference=reference,
        emulate=emulate,
        probes=_probes,
        keys=_keys,
        forward_names=("g", "attention", "z"),
        buffer_names=("bn.running_mean", "bn.running_var"),
        conventions=conventions,
        summary=_summary,
        terms=_terms,
    )
)
