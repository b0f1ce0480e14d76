"""GCNet's global context block and the disentangled non-local block as families of the
oracle (:mod:`nlref.testing.families`).

Each family gives :func:`nlref.testing.compare` what it needs to check a module of that
block (mmcv's ``ContextBlock``, timm's ``GlobalContext``, mmsegmentation's
``DisentangledNonLocal2d``, or yours, described by a ``Layout`` with ``family="gcnet"`` or
``"dnl"``):

- ``reference``: :mod:`nlref.family.gcnet` or :mod:`nlref.family.dnl`, forward and
  hand-derived backward; the rows are GCNet's attention α (with ``pooling="att"``) and
  context c, or DNL's values g, pairwise attention and unary attention, then z, the BN
  statistics, every parameter gradient and dx;
- ``probes``: GCNet's rows where the layout's ``probes`` name a sub-module or method
  (mmcv's ``softmax`` and ``spatial_pool``); DNL's g and pairwise attention as for the
  Non-local block (mmsegmentation's ``g`` and ``embedded_gaussian``);
- ``conventions``: GCNet's layer-norm ε (mmcv's 1e-5, timm's 1e-6); DNL's logit scale
  (mmsegmentation's float32 1/√C′ and τ, the exact ones, or none) and BN's mode.

They compare in float64 and float32; float16 and bfloat16 need a step-by-step emulation
of the block, which these families do not have (``compare`` says so).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..family import DNLConfig, GCNetConfig, dnl, gcnet, param_shapes
from .diagnosis import Change, Context, State
from .families import Family, Probe, in_backward_order, register_family
from .nonlocal_block import _keys, _read, bn_mode_change
from .nonlocal_block import _probes as nonlocal_probes

__all__ = ["DNL", "GCNET"]


def _as_arrays(out: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in out.items()}


# --------------------------------------------------------------------------- GCNet


def gcnet_reference(
    cfg: GCNetConfig,
    params: Mapping[str, np.ndarray],
    x: np.ndarray,
    dz: np.ndarray,
    training: bool,
    backward: bool = True,
) -> dict[str, np.ndarray]:
    """GCNet's tensors for the oracle: α (``pooling="att"``), the context c, z, then (with
    ``backward``) every parameter gradient and dx."""
    z, cache = gcnet.forward(x, params, cfg, training)
    out: dict[str, Any] = {}
    if cfg.pooling == "att":
        out["attention"] = cache.attention
    out["context"] = cache.global_context
    out["z"] = z
    if backward:
        dx, grads = gcnet.backward(dz, cache)
        out.update(in_backward_order(grads, param_shapes(cfg)))
        out["dx"] = dx
    return _as_arrays(out)


def _gcnet_probes(layout: Any, module: Any, cfg: GCNetConfig) -> list[Probe]:
    where = dict(layout.probes)
    why = f"not exposed by {type(module).__name__} (computed inside forward)"
    return [Probe(name, target=where.get(name), why_not=why) for name in ("attention", "context")]


_LN_EPS = {1e-5: "nn.LayerNorm's default: mmcv's", 1e-6: "LayerNorm2d's: timm's"}


def _eps_text(eps: float) -> str:
    return f"{eps:g}" + (f" ({_LN_EPS[eps]})" if eps in _LN_EPS else "")


def gcnet_conventions(cfg: GCNetConfig, training: bool, x_shape: tuple[int, ...]) -> list[Change]:
    """The layer norm's ε: mmcv's 1e-5 or timm's 1e-6."""

    def text(a: State, b: State) -> str:
        return (
            f"layer norm ε: the module behaves as {_eps_text(b.cfg.ln_eps)}, nlref used "
            f"{_eps_text(a.cfg.ln_eps)}"
        )

    changes = []
    for eps in _LN_EPS:
        if eps == cfg.ln_eps:
            continue

        def set_eps(state: State, context: Context, eps: float = eps) -> State:
            return state.with_(cfg=GCNetConfig(**{**state.cfg.to_dict(), "ln_eps": eps}))

        changes.append(Change("ln_eps", set_eps, text, lambda b: {"ln_eps": b.cfg.ln_eps}))
    return changes


def _gcnet_summary(cfg: GCNetConfig) -> str:
    return (
        f"config: GCNet, C={cfg.in_channels}, C′={cfg.inter_channels}, pooling={cfg.pooling}, "
        f"fusion={'+'.join(cfg.fusion)}, ln_eps={cfg.ln_eps:g}"
    )


GCNET = register_family(
    Family(
        name="gcnet",
        read=_read,
        reference=gcnet_reference,
        emulate=None,
        probes=_gcnet_probes,
        keys=_keys,
        forward_names=("attention", "context", "z"),
        buffer_names=(),
        conventions=gcnet_conventions,
        summary=_gcnet_summary,
        related=lambda cfg, training: {"mask.bias": "mask.weight"},
    )
)


# --------------------------------------------------------------------------- DNL


def dnl_reference(
    cfg: DNLConfig,
    params: Mapping[str, np.ndarray],
    x: np.ndarray,
    dz: np.ndarray,
    training: bool,
    backward: bool = True,
) -> dict[str, np.ndarray]:
    """DNL's tensors for the oracle: g, the pairwise attention, the unary attention, z,
    then (with ``backward``) the updated BN statistics, every parameter gradient and dx."""
    z, cache = dnl.forward(x, params, cfg, training)
    out: dict[str, Any] = {
        "g": cache.values,
        "attention": cache.attention,
        "unary": cache.unary_attention,
        "z": z,
    }
    if backward:
        dx, grads = dnl.backward(dz, cache)
        out.update(cache.updated_buffers)
        out.update(in_backward_order(grads, param_shapes(cfg)))
        out["dx"] = dx
    return _as_arrays(out)


def _dnl_probes(layout: Any, module: Any, cfg: DNLConfig) -> list[Probe]:
    unary = dict(layout.probes).get("unary")
    why = f"not exposed by {type(module).__name__} (computed inside forward)"
    return [*nonlocal_probes(layout, module, cfg), Probe("unary", target=unary, why_not=why)]


def _scales(cfg: DNLConfig) -> dict[str, tuple[float | None, float]]:
    """Named (scale, temperature) pairs: mmsegmentation's float32 numbers, the exact ones."""
    from ..interop.layouts import mmseg_scale

    ci = cfg.inter_channels
    exact_tau = float(str(np.float32(cfg.temperature)))  # the τ a float32 τ was written as
    return {
        "mmsegmentation's float32 1/√C′ and τ (use_scale=True)": tuple(
            mmseg_scale(ci, True, exact_tau).values()
        ),
        "no scale and a float32 τ (use_scale=False)": (None, float(np.float32(exact_tau))),
        f"the exact 1/√C′ = {ci**-0.5:.6g} and τ = {exact_tau:g} in float64": (
            ci**-0.5,
            exact_tau,
        ),
        f"no scale and the exact τ = {exact_tau:g}": (None, exact_tau),
    }


def dnl_conventions(cfg: DNLConfig, training: bool, x_shape: tuple[int, ...]) -> list[Change]:
    """The logit scale α/τ (mmsegmentation's float32 numbers, the exact ones, or no
    scale), and BN's mode."""
    changes = []
    named = _scales(cfg)

    def describe(scale: float | None, temperature: float) -> str:
        for name, value in named.items():
            if value == (scale, temperature):
                return name
        return f"α = {scale}, τ = {temperature}"

    for scale, temperature in named.values():
        effective = (1.0 if scale is None else scale) / temperature
        if effective == cfg.effective_scale:
            continue

        def set_scale(
            state: State, context: Context, scale: Any = scale, temperature: float = temperature
        ) -> State:
            fields = {**state.cfg.to_dict(), "scale": scale, "temperature": temperature}
            return state.with_(cfg=DNLConfig(**fields))

        def text(a: State, b: State) -> str:
            return (
                f"scale: the module behaves as {describe(b.cfg.scale, b.cfg.temperature)}, "
                f"nlref used {describe(a.cfg.scale, a.cfg.temperature)}"
            )

        changes.append(
            Change(
                "scale",
                set_scale,
                text,
                lambda b: {"scale": b.cfg.scale, "temperature": b.cfg.temperature},
            )
        )
    if cfg.norm is not None:
        changes.append(bn_mode_change())
    return changes


def _dnl_related(cfg: DNLConfig, training: bool) -> dict[str, str]:
    """The biases whose gradient is zero by construction (docs/derivations.md, DNL)."""
    zero = ["mask", "theta", "phi"] + (["g", "z"] if cfg.norm is not None and training else [])
    has_bias = (*cfg.biases, "mask")
    return {f"{layer}.bias": f"{layer}.weight" for layer in zero if layer in has_bias}


def _dnl_summary(cfg: DNLConfig) -> str:
    pool = "off" if cfg.sub_sample is None else f"{cfg.sub_sample} {cfg.pool_order}"
    scale = "None" if cfg.scale is None else f"{cfg.scale:.9g}"
    return (
        f"config: DNL, C={cfg.in_channels}, C′={cfg.inter_channels}, scale={scale}, "
        f"temperature={cfg.temperature:.9g} (α/τ = {cfg.effective_scale:.9g}), "
        f"sub_sample={pool}, norm={cfg.norm}, biases={','.join(cfg.biases) or 'none'}"
    )


DNL = register_family(
    Family(
        name="dnl",
        read=_read,
        reference=dnl_reference,
        emulate=None,
        probes=_dnl_probes,
        keys=_keys,
        forward_names=("g", "attention", "unary", "z"),
        buffer_names=("bn.running_mean", "bn.running_var"),
        conventions=dnl_conventions,
        summary=_dnl_summary,
        related=_dnl_related,
    )
)
