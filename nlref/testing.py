r"""nlref as a test oracle: check a PyTorch Non-local module tensor by tensor.

:func:`compare` runs two computations in float64 on the same input and upstream gradient:

- the module's own forward and its torch autograd backward (on a float64 deep copy: the
  module you pass is never modified);
- nlref's forward and hand-derived backward, on the config and weights that
  :func:`nlref.interop.torch.from_torch` reads from the module.

It returns a :class:`Report`: one row per tensor (the values g and the attention where the
module exposes them, z, the updated BN running statistics, every parameter gradient and
dx), each with its max abs and max rel error, the first tensor that diverges, and the
module's own exception if its forward or backward raised. :func:`assert_matches` raises an
``AssertionError`` carrying the report's table, for use in your own pytest suite::

    import torch, nlref.testing
    from mmcv.cnn import NonLocal2d

    block = nlref.testing.randomize(NonLocal2d(16, mode="dot_product", sub_sample=True))
    nlref.testing.assert_matches(block, torch.randn(2, 16, 9, 7))

nlref itself never uses autograd: torch computes only the module's side. torch is
imported when a function here is called, not when this module is imported.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import math
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._backend import to_numpy
from .block import backward, forward
from .config import NonLocalConfig

__all__ = [
    "MODULE_LAYOUTS",
    "Report",
    "Row",
    "assert_matches",
    "compare",
    "load_timm_nonlocal_attn",
    "make_module",
    "randomize",
]

#: Layouts that :func:`make_module` builds from their real PyPI packages.
MODULE_LAYOUTS = ("mmcv", "pytorchvideo", "timm")

_PACKAGES = {
    "mmcv": "mmcv-lite==2.2.0 mmengine",
    "pytorchvideo": "pytorchvideo==0.1.5",
    "timm": "timm",
}
_G_MODULE = {"mmcv": "g", "alexhex7": "g", "timm": "g", "pytorchvideo": "conv_g"}
_LAYER_ORDER = ("bn", "z", "concat", "g", "phi", "theta")  # the order backward reaches them


@dataclass(frozen=True)
class Row:
    """One compared tensor.

    Attributes
    ----------
    name : str
        nlref's name: ``"g"`` (the values, B×C′×N′), ``"attention"`` (B×N×N′), ``"z"``,
        ``"bn.running_mean"``, ``"bn.running_var"`` (after a training-mode forward), a
        parameter name such as ``"theta.weight"`` (its gradient), or ``"dx"``.
    stage : {"forward", "buffers", "backward"}
    source : str
        Where the module's value comes from (``"conv_theta.weight.grad"``, ...).
    shape : tuple of int
        nlref's shape of the tensor.
    status : {"ok", "FAIL", "not run", "frozen"}
        ``"not run"``: the module raised before computing it; ``"frozen"``: the module's
        parameter has ``requires_grad=False``, so it has no gradient to compare.
    max_abs_err, max_rel_err : float or None
        ``max |module − nlref|`` and ``max |module − nlref| / max(|nlref|, atol/rtol)``;
        None when not compared.
    magnitude : float or None
        ``max |nlref|``, to judge the errors against.
    where : tuple of int or None
        Index of the largest relative error.
    detail : str
        Why a row failed or was not compared.
    """

    name: str
    stage: str
    source: str
    shape: tuple[int, ...]
    status: str
    max_abs_err: float | None = None
    max_rel_err: float | None = None
    magnitude: float | None = None
    where: tuple[int, ...] | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        """True when the tensor was compared and matched."""
        return self.status == "ok"


@dataclass(frozen=True)
class Report:
    """The outcome of :func:`compare`; ``str(report)`` is a readable table.

    Attributes
    ----------
    layout : str
    module : str
        The module's class.
    cfg : NonLocalConfig
        What nlref read from the module.
    input_shape : tuple of int
    training : bool
    rtol, atol : float
    rows : tuple of Row
        In the order the computation produces them: forward tensors, BN buffers, then the
        gradients in the order backward reaches them, dx last.
    module_error : str or None
        The module's exception (type and message) if its forward or backward raised.
    module_error_stage : {"forward", "backward", None}
    notes : tuple of str
        For example which tensors the module does not expose.
    """

    layout: str
    module: str
    cfg: NonLocalConfig
    input_shape: tuple[int, ...]
    training: bool
    rtol: float
    atol: float
    rows: tuple[Row, ...]
    module_error: str | None = None
    module_error_stage: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """True when the module ran forward and backward and every tensor matched."""
        compared = [r for r in self.rows if r.status != "frozen"]
        return self.module_error is None and bool(compared) and all(r.ok for r in compared)

    @property
    def first_divergence(self) -> str | None:
        """The name of the first row (in computation order) whose values differ, or None."""
        return next((r.name for r in self.rows if r.status == "FAIL"), None)

    @property
    def worst(self) -> Row | None:
        """The compared row with the largest relative error."""
        compared = [r for r in self.rows if r.max_rel_err is not None]
        return max(compared, key=lambda r: r.max_rel_err, default=None)

    def row(self, name: str) -> Row:
        """The row called ``name``.

        Raises
        ------
        KeyError
            If there is none; the message lists the rows.
        """
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no row {name!r}; rows: {[r.name for r in self.rows]}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the report."""
        cfg = self.cfg
        return {
            "layout": self.layout,
            "module": self.module,
            "config": cfg.to_dict(),
            "input_shape": list(self.input_shape),
            "training": self.training,
            "rtol": self.rtol,
            "atol": self.atol,
            "ok": self.ok,
            "first_divergence": self.first_divergence,
            "module_error": self.module_error,
            "module_error_stage": self.module_error_stage,
            "notes": list(self.notes),
            "rows": [
                {
                    "name": r.name,
                    "stage": r.stage,
                    "source": r.source,
                    "shape": list(r.shape),
                    "status": r.status,
                    "max_abs_err": _finite_or_none(r.max_abs_err),
                    "max_rel_err": _finite_or_none(r.max_rel_err),
                    "magnitude": r.magnitude,
                    "where": None if r.where is None else list(r.where),
                    "detail": r.detail,
                }
                for r in self.rows
            ],
        }

    def __str__(self) -> str:
        cfg = self.cfg
        pool = "off" if cfg.sub_sample is None else f"{cfg.sub_sample} {cfg.pool_order}"
        scale = "None" if cfg.scale is None else f"{cfg.scale:.6g}"
        head = [
            f"nlref oracle: {self.module} (layout {self.layout}) vs nlref, float64",
            f"config: pairwise={cfg.pairwise}, C={cfg.in_channels}, C′={cfg.inter_channels}, "
            f"scale={scale}, sub_sample={pool}, norm={cfg.norm}, "
            f"biases={','.join(cfg.biases) or 'none'}",
            f"input: x {self.input_shape}, training={self.training}; a tensor passes when "
            f"|module − nlref| ≤ max(rtol·|nlref|, atol), rtol {self.rtol:g}, atol {self.atol:g}",
            "",
        ]
        header = [
            "step",
            "tensor",
            "module",
            "shape",
            "max |nlref|",
            "max abs err",
            "max rel err",
            "status",
        ]
        body = [
            [
                r.stage,
                r.name,
                r.source,
                "x".join(map(str, r.shape)) or "()",
                _e(r.magnitude),
                _e(r.max_abs_err),
                _e(r.max_rel_err),
                r.status + (f" ({r.detail})" if r.detail and r.status != "ok" else ""),
            ]
            for r in self.rows
        ]
        aligns = ["<", "<", "<", "<", ">", ">", ">", "<"]
        widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

        def fmt(line: list[str]) -> str:
            cells = (f"{v:{a}{w}}" for v, a, w in zip(line, aligns, widths, strict=True))
            return "  ".join(cells).rstrip()

        lines = [*head, fmt(header), "-" * len(fmt(["-" * w for w in widths]))]
        lines += [fmt(line) for line in body]
        lines.append("")
        lines += [f"note: {n}" for n in self.notes]
        if self.module_error is not None:
            lines.append(f"module error in {self.module_error_stage}: {self.module_error}")
        lines.append(self.verdict())
        return "\n".join(lines)

    def verdict(self) -> str:
        """The one-line conclusion at the end of ``str(report)``."""
        compared = [r for r in self.rows if r.max_abs_err is not None]
        failed = [r for r in compared if r.status == "FAIL"]
        if self.module_error is not None and self.module_error_stage == "forward":
            return "FAIL: the module's forward raised; nothing could be compared"
        if failed:
            first = failed[0]
            return (
                f"FAIL: first divergence at {first.name} ({first.stage}), max abs err "
                f"{_e(first.max_abs_err)}; {len(failed)} of {len(compared)} compared tensors "
                "differ"
            )
        if self.module_error is not None:
            return (
                f"FAIL: the module's {self.module_error_stage} raised; what it computed "
                f"matches nlref ({len(compared)} of {len(compared)} tensors ok)"
            )
        worst = self.worst
        if worst is None:
            return "FAIL: nothing was compared"
        return (
            f"PASS: {len(compared)} tensors match (worst max rel err "
            f"{_e(worst.max_rel_err)}: {worst.name})"
        )


def _e(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1e}" if math.isfinite(v) else str(v)


def _finite_or_none(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _compare_arrays(
    name: str,
    stage: str,
    source: str,
    got: np.ndarray,
    want: np.ndarray,
    rtol: float,
    atol: float,
) -> Row:
    want = np.asarray(want, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    magnitude = float(np.max(np.abs(want), initial=0.0))
    if got.shape != want.shape:
        return Row(
            name,
            stage,
            source,
            want.shape,
            "FAIL",
            math.inf,
            math.inf,
            magnitude,
            detail=f"module gives shape {got.shape}",
        )
    err = np.abs(got - want)
    rel = err / np.maximum(np.abs(want), atol / rtol)
    if rel.size == 0:
        return Row(name, stage, source, want.shape, "ok", 0.0, 0.0, magnitude)
    flat = int(np.nanargmax(rel)) if not np.all(np.isnan(rel)) else 0
    max_rel = float(np.max(rel)) if not np.any(np.isnan(rel)) else math.nan
    max_abs = float(np.max(err)) if not np.any(np.isnan(err)) else math.nan
    ok = bool(max_rel <= rtol)  # False for NaN
    where = tuple(int(i) for i in np.unravel_index(flat, rel.shape))
    return Row(
        name,
        stage,
        source,
        want.shape,
        "ok" if ok else "FAIL",
        max_abs,
        max_rel,
        magnitude,
        where=where,
        detail="" if ok else f"worst at {where}",
    )


def _accepts(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def compare(
    module: Any,
    x: Any,
    dz: Any = None,
    training: bool | None = None,
    *,
    layout: str | None = None,
    rtol: float = 1e-10,
    atol: float = 1e-10,
    seed: int = 0,
    **cfg_overrides: Any,
) -> Report:
    """Compare a PyTorch Non-local module with nlref, forward and backward, in float64.

    Parameters
    ----------
    module : torch.nn.Module
        A block in one of the layouts of :mod:`nlref.interop.torch`. It is deep-copied,
        moved to the CPU and cast to float64; the module itself is not modified (no BN
        statistics update).
    x : array or tensor, shape (B, C, *S)
        The input (cast to float64).
    dz : array or tensor, optional
        The upstream gradient ∂L/∂z, like x. Default: N(0, 1) drawn with ``seed``.
    training : bool, optional
        Batch-norm mode. Default: the module's ``module.training``.
    layout : str, optional
        Force a layout instead of recognising it.
    rtol, atol : float
        A tensor matches when ``|module − nlref| ≤ max(rtol·|nlref|, atol)`` everywhere.
    seed : int
        Seed of the default ``dz``.
    **cfg_overrides
        Passed to :func:`nlref.interop.torch.from_torch`.

    Returns
    -------
    Report
        Never raises because the module's forward or backward raised: that exception is
        in ``report.module_error``, and whatever the module did compute is still compared.

    Raises
    ------
    TypeError, ValueError
        If the module is not a recognised Non-local block, or x / dz do not fit it.
    """
    import torch

    from .interop.torch import from_torch, key_map, module_layout

    layout = module_layout(module) if layout is None else layout
    cfg, params = from_torch(module, layout=layout, dtype="float64", **cfg_overrides)
    if training is None:
        training = bool(module.training)
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool or None, got {training!r}")
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be > 0, got rtol={rtol!r}, atol={atol!r}")
    xn = np.array(to_numpy(x), dtype=np.float64)
    if dz is None:
        dzn = np.random.default_rng(seed).standard_normal(xn.shape)
    else:
        dzn = np.array(to_numpy(dz), dtype=np.float64)
        if dzn.shape != xn.shape:
            raise ValueError(f"dz must have the shape of z (= x), {xn.shape}, got {dzn.shape}")

    # nlref: forward and hand-derived backward (raises on a bad x: a usage error)
    z_ref, cache = forward(xn, params, cfg, training=training)
    dx_ref, grads_ref = backward(dzn, cache)

    # the module: a float64 copy, with probes on the values and (where exposed) attention
    m = copy.deepcopy(module).to(device="cpu", dtype=torch.float64)
    m.train(training)
    captured: dict[str, Any] = {}
    notes: list[str] = []
    sources = {"g": f"{_G_MODULE[layout]} (output)", "attention": "", "z": "module(x)"}
    handle = m.get_submodule(_G_MODULE[layout]).register_forward_hook(
        lambda mod, inp, out: captured.__setitem__("g", out.detach().clone())
    )
    call_kwargs: dict[str, Any] = {}
    if layout == "mmcv":
        _probe_mmcv_attention(m, captured)
        sources["attention"] = f"{m.mode}() (output)"
    elif layout == "alexhex7" and _accepts(m.forward, "return_nl_map"):
        call_kwargs["return_nl_map"] = True
        sources["attention"] = "forward(x, return_nl_map=True)[1]"
    else:
        notes.append(f"attention: not exposed by {type(module).__name__} (computed inside forward)")

    xt = torch.tensor(xn, dtype=torch.float64, requires_grad=True)
    error: str | None = None
    stage: str | None = None
    z_t = None
    try:
        out = m(xt, **call_kwargs)
        if call_kwargs:
            out, attention = out
            captured["attention"] = attention.detach().clone()
        z_t = out
    except Exception as err:  # the module's own failure is a finding, not a crash
        error, stage = f"{type(err).__name__}: {err}", "forward"
    finally:
        handle.remove()
    if z_t is not None:
        try:
            z_t.backward(torch.tensor(dzn, dtype=torch.float64))
        except Exception as err:
            error, stage = f"{type(err).__name__}: {err}", "backward"

    rows: list[Row] = []
    b, ci = xn.shape[0], cfg.inter_channels

    def add(name: str, stage_: str, source: str, got: Any, want: Any) -> None:
        want = np.asarray(want)
        if got is None:
            rows.append(Row(name, stage_, source, want.shape, "not run"))
        else:
            rows.append(_compare_arrays(name, stage_, source, got, want, rtol, atol))

    forward_ran = z_t is not None
    g_mod = captured.get("g")
    add(
        "g",
        "forward",
        sources["g"],
        None if g_mod is None else g_mod.reshape(b, ci, -1).numpy(),
        _values(cache),
    )
    if sources["attention"]:
        att = captured.get("attention")
        add(
            "attention",
            "forward",
            sources["attention"],
            None if att is None else att.numpy(),
            _attention(cache),
        )
    add("z", "forward", sources["z"], z_t.detach().numpy() if forward_ran else None, z_ref)

    kmap = key_map(layout, cfg)
    if cfg.norm is not None and training:
        buffers = dict(m.named_buffers())
        for name in ("bn.running_mean", "bn.running_var"):
            got = buffers[kmap[name]].detach().numpy() if forward_ran else None
            add(name, "buffers", f"{kmap[name]} (after)", got, cache.updated_buffers[name])

    backward_ran = forward_ran and error is None
    module_params = dict(m.named_parameters())
    order = sorted(
        grads_ref,
        key=lambda n: (_LAYER_ORDER.index(n.split(".")[0]), 0 if n.endswith("weight") else 1),
    )
    for name in order:
        key = kmap[name]
        p = module_params[key]
        source = f"{key}.grad"
        want = grads_ref[name]
        if not p.requires_grad:
            rows.append(Row(name, "backward", source, tuple(want.shape), "frozen"))
            continue
        got = None
        if backward_ran:
            got = np.zeros(want.shape) if p.grad is None else p.grad.reshape(want.shape).numpy()
        add(name, "backward", source, got, want)
    add("dx", "backward", "x.grad", xt.grad.numpy() if backward_ran else None, dx_ref)

    return Report(
        layout=layout,
        module=type(module).__name__,
        cfg=cfg,
        input_shape=tuple(xn.shape),
        training=training,
        rtol=rtol,
        atol=atol,
        rows=tuple(rows),
        module_error=error,
        module_error_stage=stage,
        notes=tuple(notes),
    )


def _values(cache: Any) -> Any:
    """g (B, C′, N′) from nlref's cache, whether the attention was chunked or not."""
    return cache.values


def _attention(cache: Any) -> Any:
    """The attention (B, N, N′), recomputed block by block if forward ran in chunks."""
    if hasattr(cache, "attention_rows"):
        return cache.attention_rows(0, math.prod(cache.input_shape[2:]))
    return cache.attention


def _probe_mmcv_attention(m: Any, captured: dict[str, Any]) -> None:
    """Record what mmcv's pairwise method (``m.<mode>(theta, phi)``) returns.

    mmcv's forward calls ``getattr(self, self.mode)``; an instance attribute of that name
    (on our private copy) wraps the class's method and keeps a copy of its output, the
    normalised attention (B, N, N′).
    """
    method = getattr(m, m.mode)  # bound: the class's method, or an instance's patch of it

    def probe(theta_x: Any, phi_x: Any) -> Any:
        out = method(theta_x, phi_x)
        captured["attention"] = out.detach().clone()
        return out

    object.__setattr__(m, m.mode, probe)


def assert_matches(
    module: Any,
    x: Any,
    rtol: float = 1e-10,
    atol: float = 1e-10,
    **kwargs: Any,
) -> Report:
    """:func:`compare`, raising an ``AssertionError`` with the report's table on mismatch.

    ``kwargs`` go to :func:`compare` (``dz``, ``training``, ``layout``, ``seed``, config
    overrides). Returns the report when everything matches.
    """
    report = compare(module, x, rtol=rtol, atol=atol, **kwargs)
    if not report.ok:
        raise AssertionError("the module does not match nlref\n" + str(report))
    return report


# --------------------------------------------------------------------------- real modules


def randomize(module: Any, rng: int | np.random.Generator | None = 0) -> Any:
    """Give every parameter and BN buffer of ``module`` a random, non-degenerate value.

    Conv weights N(0, 1/fan_in), biases N(0, 0.2²), BN γ ∈ [0.5, 1.5], β and running mean
    N(0, 0.2²), running variance ∈ [0.5, 2]: unlike the implementations' own
    initialisations (BN γ = 0, which makes the block the identity and most gradients
    zero), every tensor of the comparison then carries information. In place; returns
    ``module``. Random numbers come from NumPy, so a seed gives the same values anywhere.
    """
    import torch
    from torch import nn

    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)

    def fill(t: Any, values: np.ndarray) -> None:
        t.copy_(torch.as_tensor(values.reshape(tuple(t.shape)), dtype=t.dtype))

    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                c = mod.num_features
                if mod.affine:
                    fill(mod.weight, gen.uniform(0.5, 1.5, c))
                    fill(mod.bias, gen.normal(0.0, 0.2, c))
                if mod.track_running_stats:
                    fill(mod.running_mean, gen.normal(0.0, 0.2, c))
                    fill(mod.running_var, gen.uniform(0.5, 2.0, c))
                continue
            for name, p in mod.named_parameters(recurse=False):
                if name == "weight" and p.dim() >= 2:
                    fan_in = int(np.prod(tuple(p.shape[1:])))
                    fill(p, gen.normal(0.0, 1.0 / math.sqrt(fan_in), tuple(p.shape)))
                else:
                    fill(p, gen.normal(0.0, 0.2, tuple(p.shape)))
    return module


def load_timm_nonlocal_attn() -> type:
    """timm's ``NonLocalAttn`` class, even where torchvision does not import.

    timm's package imports torchvision, and the torchvision wheel that installs beside
    torch 2.13.0 (CPU) fails to import. ``NonLocalAttn`` itself needs nothing from it, so
    when ``from timm.layers import NonLocalAttn`` fails this loads the real
    ``timm/layers/non_local_attn.py`` (and the timm modules it imports) without running
    timm's package ``__init__``, with a stub ``torchvision.ops.misc`` that only satisfies
    the import of ``FrozenBatchNorm2d`` in ``timm.layers.norm_act``. ``sys.modules`` is
    restored afterwards.

    Raises
    ------
    ImportError
        If timm is not installed.
    """
    try:
        from timm.layers import NonLocalAttn

        return NonLocalAttn
    except ImportError as err:
        if importlib.util.find_spec("timm") is None:
            raise ImportError("timm is not installed: pip install timm") from err
    except Exception:  # torchvision raising RuntimeError on import
        pass
    import torch

    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover
        raise ImportError("timm is not installed: pip install timm")
    root = next(iter(spec.submodule_search_locations))
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in ("timm", "torchvision")}
    for k in saved:
        del sys.modules[k]

    def package(name: str, path: list[str]) -> types.ModuleType:
        mod = types.ModuleType(name)
        mod.__path__ = path
        sys.modules[name] = mod
        return mod

    try:
        package("torchvision", [])
        package("torchvision.ops", [])
        misc = types.ModuleType("torchvision.ops.misc")

        class FrozenBatchNorm2d(torch.nn.Module):  # only imported, never used by NonLocalAttn
            pass

        misc.FrozenBatchNorm2d = FrozenBatchNorm2d
        sys.modules["torchvision.ops.misc"] = misc
        package("timm", [root])
        package("timm.layers", [f"{root}/layers"])
        module = importlib.import_module("timm.layers.non_local_attn")
        return module.NonLocalAttn
    finally:
        for k in [k for k in sys.modules if k.split(".")[0] in ("timm", "torchvision")]:
            del sys.modules[k]
        sys.modules.update(saved)


def make_module(
    layout: str,
    in_channels: int = 8,
    *,
    pairwise: str = "embedded_gaussian",
    dims: int = 2,
    sub_sample: bool | tuple[int, ...] = False,
    norm: bool = True,
    inter_channels: int | None = None,
) -> Any:
    """Build a real Non-local module of ``layout`` from its own package.

    Parameters
    ----------
    layout : {"mmcv", "pytorchvideo", "timm"}
        mmcv ``NonLocal{dims}d(in_channels, mode=pairwise, sub_sample=..., norm_cfg=BN or
        None)``; pytorchvideo ``create_nonlocal(dim_in, dim_inner, pool_size,
        instantiation, norm=BatchNorm3d or None)`` (3-D only); timm
        ``NonLocalAttn(in_channels, rd_channels=inter_channels)`` (2-D, always BN, no
        pooling). AlexHex7 is not on PyPI: build its module yourself.
    sub_sample : bool or tuple
        mmcv takes a bool; pytorchvideo a bool (``(1, 2, 2)``) or its ``pool_size``.

    Raises
    ------
    ValueError
        For a layout that cannot be built or an option it does not have.
    ImportError
        If the package is not installed (the message says what to install).
    """
    if layout not in MODULE_LAYOUTS:
        raise ValueError(
            f"make_module builds {MODULE_LAYOUTS} from their packages, got {layout!r}"
            + (
                " (AlexHex7 is not on PyPI: build its module yourself)"
                if layout == "alexhex7"
                else ""
            )
        )
    try:
        if layout == "mmcv":
            from mmcv.cnn import NonLocal1d, NonLocal2d, NonLocal3d
        elif layout == "pytorchvideo":
            from pytorchvideo.layers.nonlocal_net import create_nonlocal
    except ImportError as err:
        raise ImportError(f"layout {layout!r} needs: pip install {_PACKAGES[layout]}") from err

    if layout == "mmcv":
        if dims not in (1, 2, 3):
            raise ValueError(f"mmcv has NonLocal1d/2d/3d, got dims={dims!r}")
        if not isinstance(sub_sample, bool):
            raise ValueError(f"mmcv's sub_sample is a bool, got {sub_sample!r}")
        cls = {1: NonLocal1d, 2: NonLocal2d, 3: NonLocal3d}[dims]
        bn = {1: "BN1d", 2: "BN", 3: "BN3d"}[dims]  # mmcv's "BN" is BatchNorm2d
        reduction = 2 if inter_channels is None else in_channels // inter_channels
        module = cls(
            in_channels,
            reduction=reduction,
            mode=pairwise,
            sub_sample=sub_sample,
            norm_cfg=dict(type=bn) if norm else None,
        )
        if module.inter_channels != (inter_channels or module.inter_channels):
            raise ValueError(
                f"mmcv sets C′ = max(C // reduction, 1); C′={inter_channels} is not reachable "
                f"from C={in_channels}"
            )
        return module
    if layout == "pytorchvideo":
        import torch

        if dims != 3:
            raise ValueError(f"pytorchvideo's NonLocal is 3-D only, got dims={dims!r}")
        inst = {"embedded_gaussian": "softmax", "dot_product": "dot_product"}
        if pairwise not in inst:
            raise ValueError(f"pytorchvideo has pairwise {tuple(inst)}, got {pairwise!r}")
        pool = (1, 2, 2) if sub_sample is True else (1, 1, 1) if not sub_sample else sub_sample
        return create_nonlocal(
            dim_in=in_channels,
            dim_inner=inter_channels or max(in_channels // 2, 1),
            pool_size=tuple(pool),
            instantiation=inst[pairwise],
            norm=torch.nn.BatchNorm3d if norm else None,
        )
    # timm
    if dims != 2 or sub_sample or not norm or pairwise != "embedded_gaussian":
        raise ValueError(
            "timm's NonLocalAttn is 2-D, embedded Gaussian, with BN and no pooling; got "
            f"dims={dims}, pairwise={pairwise!r}, sub_sample={sub_sample!r}, norm={norm!r}"
        )
    return load_timm_nonlocal_attn()(in_channels, rd_channels=inter_channels)
