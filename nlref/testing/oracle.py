""":func:`compare` and :func:`assert_matches`: one PyTorch module against nlref."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .._backend import to_numpy
from .diagnosis import Context, State, explain, search
from .families import Family, Probe, get_family
from .precision import FACTOR, UNIT_ROUNDOFF, check_precision, expected_errors
from .report import Report, Row

__all__ = ["assert_matches", "compare"]


def _compare_float64(
    name: str, stage: str, source: str, got: np.ndarray, want: np.ndarray, rtol: float, atol: float
) -> Row:
    magnitude = float(np.max(np.abs(want), initial=0.0))
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
        name, stage, source, want.shape, "ok" if ok else "FAIL", max_abs, max_rel, magnitude,
        where=where, detail="" if ok else f"worst at {where}",
    )  # fmt: skip


def _compare_low(
    name: str, stage: str, source: str, got: np.ndarray, want: np.ndarray, expected: float,
    factor: float,
) -> Row:  # fmt: skip
    magnitude = float(np.max(np.abs(want), initial=0.0))
    err = np.abs(got - want)
    if err.size == 0:
        return Row(name, stage, source, want.shape, "ok", 0.0, 0.0, magnitude, None, "",
                   expected, factor * expected)  # fmt: skip
    nan = bool(np.any(np.isnan(err)))
    max_abs = math.nan if nan else float(np.max(err))
    flat = 0 if np.all(np.isnan(err)) else int(np.nanargmax(err))
    where = tuple(int(i) for i in np.unravel_index(flat, err.shape))
    allowed = factor * expected
    ok = bool(max_abs <= allowed)  # False for NaN
    detail = "" if ok else f"{max_abs / expected:.3g} × the expected error, worst at {where}"
    return Row(
        name, stage, source, want.shape, "ok" if ok else "FAIL", max_abs,
        max_abs / max(magnitude, np.finfo(np.float64).tiny), magnitude, where, detail,
        expected, allowed,
    )  # fmt: skip


def _as_rounded(value: Any, torch_dtype: Any) -> np.ndarray:
    """``value`` rounded to the module's dtype, as exact float64."""
    import torch

    t = torch.as_tensor(np.asarray(to_numpy(value), dtype=np.float64))
    return t.to(torch_dtype).to(torch.float64).numpy().copy()


def _install(m: Any, probe: Probe, captured: dict[str, Any]) -> list[Any]:
    """Install ``probe`` on the oracle's copy ``m``; returns handles to remove."""
    from torch import nn

    from ..interop.torch import submodule

    def keep(value: Any) -> None:
        if probe.name not in captured and hasattr(value, "detach"):
            captured[probe.name] = value.detach().clone()

    target = probe.target
    if target is None:
        return []
    sub = submodule(m, target)
    if sub is not None:
        return [sub.register_forward_hook(lambda mod, inp, out: keep(out))]
    owner_path, _, attr = target.rpartition(".")
    owner = submodule(m, owner_path) if owner_path else m
    method = getattr(owner, attr, None) if owner is not None else None
    if method is None or not callable(method) or isinstance(method, nn.Module):
        return []

    def wrapped(*args: Any, **kwargs: Any) -> Any:  # the method's output, kept on the way out
        out = method(*args, **kwargs)
        keep(out)
        return out

    object.__setattr__(owner, attr, wrapped)  # on the oracle's private copy only
    return []


def _fit(t: Any, shape: tuple[int, ...], channels_last: bool) -> tuple[np.ndarray | None, str]:
    """A captured tensor in nlref's shape, or None and why not."""
    a = t.detach().to("cpu").double().numpy()
    if a.size != math.prod(shape):
        return None, f"the probe saw shape {tuple(a.shape)}, not one with nlref's {shape}"
    if channels_last:  # (B, ..., C) -> (B, C, ...)
        a = np.moveaxis(a.reshape(shape[0], -1, shape[1]), -1, 1)
    return a.reshape(shape), ""


def _run_module(
    m: Any,
    layout: Any,
    family: Family,
    cfg: Any,
    x: np.ndarray,
    dz: np.ndarray,
    torch_dtype: Any,
) -> tuple[dict[str, Any], str | None, str | None, list[Probe]]:
    """Run the module's forward and backward; returns (tensors, error, stage, probes)."""
    import torch

    captured: dict[str, Any] = {}
    probes = family.probes(layout, m, cfg)
    handles = [h for p in probes for h in _install(m, p, captured)]
    kwargs = {p.kwarg: True for p in probes if p.kwarg}
    xt = torch.tensor(x, dtype=torch_dtype, requires_grad=True)
    error = stage = None
    z = None
    try:
        out = m(xt.movedim(1, -1) if layout.channels_last else xt, **kwargs)
        if kwargs:
            out, *extra = out
            for p, value in zip([p for p in probes if p.kwarg], extra, strict=False):
                captured[p.name] = value.detach().clone()
        z = out.movedim(-1, 1) if layout.channels_last else out
    except Exception as err:  # the module's own failure is a finding, not a crash
        error, stage = f"{type(err).__name__}: {err}", "forward"
    finally:
        for h in handles:
            h.remove()
    if z is not None:
        try:
            z.backward(torch.tensor(dz, dtype=torch_dtype))
        except Exception as err:
            error, stage = f"{type(err).__name__}: {err}", "backward"
    tensors: dict[str, Any] = dict(captured)
    if z is not None:
        tensors["z"] = z.detach()
        buffers = dict(m.named_buffers())
        for name, key in family.keys(layout, cfg).items():
            if name in family.buffer_names and key in buffers:
                tensors[name] = buffers[key].detach()
    if z is not None and error is None:
        tensors["dx"] = xt.grad
    return tensors, error, stage, probes


def compare(
    module: Any,
    x: Any,
    dz: Any = None,
    training: bool | None = None,
    *,
    layout: Any = None,
    rtol: float = 1e-10,
    atol: float = 1e-10,
    seed: int = 0,
    dtype: str = "float64",
    randomize: bool = False,
    diagnose: bool = True,
    **cfg_overrides: Any,
) -> Report:
    """Compare a PyTorch block with nlref, forward and backward, tensor by tensor.

    Parameters
    ----------
    module : torch.nn.Module
        A block in a registered layout, or in ``layout``. It is deep-copied and moved to
        the CPU; the module itself is never modified (no BN statistics update).
    x : array or tensor, shape (B, C, \\*S)
        The input (rounded to ``dtype``).
    dz : array or tensor, optional
        The upstream gradient ∂L/∂z, like x. Default: N(0, 1) drawn with ``seed``.
    training : bool, optional
        Batch-norm mode. Default: the module's ``module.training``.
    layout : str or nlref.interop.torch.Layout, optional
        A registered layout name, or a :class:`~nlref.interop.torch.Layout` describing a
        block of your own; recognised from the module when None.
    rtol, atol : float
        In float64, a tensor matches when ``|module − nlref| ≤ max(rtol·|nlref|, atol)``
        everywhere.
    seed : int
        Seed of the default ``dz`` and of ``randomize``.
    dtype : {"float64", "float32", "float16", "bfloat16"}
        The precision the module runs in (``module.to(dtype)``, on the CPU). Below float64
        it is compared with nlref's float64 truth on the same rounded input and weights,
        and a tensor passes when its error is at most
        :data:`nlref.testing.precision.FACTOR` times the error that nlref makes in that
        precision (float32) or in a faithful emulation of it (float16, bfloat16; see
        :mod:`nlref.testing.precision`).
    randomize : bool
        Compare a copy of the module with random, non-degenerate weights
        (:func:`nlref.testing.randomize` with ``seed``), not its own: a freshly initialised
        block (BN γ or W_z zero) makes most gradients identically zero.
    diagnose : bool
        When the module differs, search the conventions that explain it
        (``report.diagnosis``).
    **cfg_overrides
        Fields of the block's config (:class:`nlref.NonLocalConfig`, or
        :class:`nlref.family.GCNetConfig` / :class:`nlref.family.DNLConfig` for the
        family), passed to :func:`nlref.interop.torch.from_torch`: what neither the weights
        nor the attributes the layout declares tell (``pairwise=``, ``scale=``,
        ``pool_order=``, ``ln_eps=``, ...).

    Returns
    -------
    Report
        Never raises because the module's forward or backward raised: that exception is
        in ``report.module_error``, and whatever the module did compute is still compared.

    Raises
    ------
    TypeError, ValueError
        If the module is not a recognised block, its config cannot be read, or x / dz do
        not fit it.
    """
    import torch

    from ..interop.torch import get_layout, module_layout, submodule
    from .modules import randomize as randomize_module

    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    fmt = check_precision(dtype)
    lay = module_layout(module) if layout is None else get_layout(layout)
    family = get_family(lay.family)
    if family.emulate is None and fmt not in ("float64", "float32"):
        raise ValueError(
            f"nlref compares a {lay.family} block in float64 and float32; its error budget "
            f"in {fmt} needs a step-by-step emulation of the block, which nlref has only for "
            "the Non-local block: pass dtype='float32' or 'float64'"
        )
    if training is None:
        training = bool(module.training)
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool or None, got {training!r}")
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be > 0, got rtol={rtol!r}, atol={atol!r}")
    torch_dtype = getattr(torch, fmt)

    m = copy.deepcopy(module).to(device="cpu")
    if randomize:
        randomize_module(m, seed)
    m = m.to(dtype=torch_dtype).train(training)
    cfg, params = family.read(m, lay, cfg_overrides)  # float64: the module's own values
    xn = _as_rounded(x, torch_dtype)
    if dz is None:
        dzn = _as_rounded(np.random.default_rng(seed).standard_normal(xn.shape), torch_dtype)
    else:
        dzn = _as_rounded(dz, torch_dtype)
        if dzn.shape != xn.shape:
            raise ValueError(f"dz must have the shape of z (= x), {xn.shape}, got {dzn.shape}")

    # nlref: forward and hand-derived backward, float64 (raises on a bad x: a usage error)
    truth = family.reference(cfg, params, xn, dzn, training)
    tensors, error, stage, probes = _run_module(m, lay, family, cfg, xn, dzn, torch_dtype)

    low = fmt != "float64"
    expected: Mapping[str, float] = {}
    if fmt == "float32":
        p32 = {k: v.astype(np.float32) for k, v in params.items()}
        expected = expected_errors(
            fmt,
            truth,
            lambda: family.reference(
                cfg, p32, xn.astype(np.float32), dzn.astype(np.float32), training
            ),
        )
    elif low:
        expected = expected_errors(
            fmt,
            truth,
            lambda: family.emulate(cfg, params, xn, dzn, training, fmt),
            family.terms(cfg, xn.shape),
        )
    if low:  # a tensor zero by construction: its rounding is that of the sums it is made of
        u = UNIT_ROUNDOFF[fmt]
        floors = {
            name: u * float(np.max(np.abs(truth[other]), initial=0.0))
            for name, other in family.related(cfg, training).items()
            if name in truth and other in truth
        }
        expected = {k: max(v, floors.get(k, 0.0)) for k, v in expected.items()}
    factor = FACTOR.get(fmt)

    notes: list[str] = []
    if randomize:
        notes.append(
            f"compared a randomised copy of the module (nlref.testing.randomize, seed {seed})"
        )
    kmap = family.keys(lay, cfg)
    module_params = dict(m.named_parameters())
    probe_of = {p.name: p for p in probes}
    rows: list[Row] = []
    got_compared: dict[str, np.ndarray] = {}
    for name, want in truth.items():
        want = np.asarray(want, dtype=np.float64)
        stage_ = family.stage(name)
        probe = probe_of.get(name)
        if probe is not None and probe.target is None and probe.kwarg is None:
            notes.append(f"{name}: {probe.why_not}")
            continue
        if probe is not None:
            if probe.kwarg:
                source = f"forward(x, {probe.kwarg}=True)[1]"
            else:
                call = "" if submodule(m, probe.target) is not None else "()"
                source = f"{probe.target}{call} (output)"
        elif name == "z":
            source = "module(x)"
        elif name == "dx":
            source = "x.grad"
        elif stage_ == "buffers":
            source = f"{kmap[name]} (after)"
        else:
            source = f"{kmap[name]}.grad"
        got: np.ndarray | None = None
        why = ""
        if stage_ == "backward" and name != "dx":
            p = module_params[kmap[name]]
            if not p.requires_grad:
                rows.append(Row(name, stage_, source, want.shape, "frozen"))
                continue
            if "dx" in tensors:
                grad = p.grad
                got = (
                    np.zeros(want.shape)
                    if grad is None
                    else grad.double().reshape(want.shape).numpy()
                )
        elif name in tensors:
            got, why = _fit(tensors[name], want.shape, bool(probe and probe.channels_last))
        elif probe is not None and error is None:
            why = f"{probe.target or probe.kwarg} never produced it"
        if got is None:
            if not why:
                raised = error is not None and (stage == "forward" or stage_ == "backward")
                why = f"{stage} raised" if raised else "not computed"
            rows.append(Row(name, stage_, source, want.shape, "not captured", detail=why))
            continue
        got_compared[name] = got
        if low:
            rows.append(_compare_low(name, stage_, source, got, want, expected[name], factor))
        else:
            rows.append(_compare_float64(name, stage_, source, got, want, rtol, atol))

    report = Report(
        layout=lay.name,
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
        dtype=fmt,
        factor=factor,
        randomized=bool(randomize),
        summary=family.summary(cfg),
    )
    if diagnose and report.first_divergence is not None:
        diagnosis = _diagnose(family, report, cfg, params, xn, dzn, training, got_compared)
        report = dataclasses.replace(report, diagnosis=diagnosis)
    return report


def _diagnose(
    family: Family,
    report: Report,
    cfg: Any,
    params: Mapping[str, np.ndarray],
    x: np.ndarray,
    dz: np.ndarray,
    training: bool,
    got: Mapping[str, np.ndarray],
) -> str | None:
    """Search the family's conventions for the changes that make the module match."""
    bounds = {}
    for row in report.rows:
        if row.name not in got:
            continue
        if row.allowed_err is not None:
            allowed = row.allowed_err

            def check(g: np.ndarray, w: np.ndarray, allowed: float = allowed) -> bool:
                return bool(np.max(np.abs(g - w), initial=0.0) <= allowed)

        else:

            def check(g: np.ndarray, w: np.ndarray) -> bool:
                rel = np.abs(g - w) / np.maximum(np.abs(w), report.atol / report.rtol)
                return bool(np.max(rel, initial=0.0) <= report.rtol)

        bounds[row.name] = check

    def run(state: State, backward: bool) -> dict[str, np.ndarray]:
        return family.reference(state.cfg, state.params, x, dz, state.training, backward=backward)

    context = Context(got=got, bounds=bounds, run=run, forward_names=family.forward_names)
    base = State(cfg=cfg, params=dict(params), training=training)
    found = search(base, family.conventions(cfg, training, tuple(x.shape)), context)
    return explain(base, found)


def assert_matches(
    module: Any,
    x: Any,
    rtol: float = 1e-10,
    atol: float = 1e-10,
    *,
    allow_vacuous: bool = False,
    **kwargs: Any,
) -> Report:
    """:func:`compare`, raising an ``AssertionError`` with the report's table on mismatch.

    Also raises when a compared tensor is identically zero in nlref (a vacuous match, as
    for every gradient upstream of a zero-initialised W_z or BN γ), unless
    ``allow_vacuous=True``; ``randomize=True`` compares a copy with non-degenerate weights
    instead. ``kwargs`` go to :func:`compare` (``dz``, ``training``, ``layout``, ``seed``,
    ``dtype``, ``randomize``, config overrides). Returns the report when everything
    matches.
    """
    report = compare(module, x, rtol=rtol, atol=atol, **kwargs)
    if not report.ok:
        raise AssertionError("the module does not match nlref\n" + str(report))
    if report.vacuous and not allow_vacuous:
        raise AssertionError(
            f"the module matches nlref, but {len(report.vacuous)} tensors are identically zero "
            f"(vacuous: {', '.join(report.vacuous)}); pass randomize=True to compare a copy "
            "with non-degenerate weights, or allow_vacuous=True\n" + str(report)
        )
    return report
