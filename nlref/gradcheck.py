r"""A numerical gradient checker for any ``forward`` / ``backward`` pair.

The check compares a hand-derived backward with central differences in float64. For a
random upstream gradient :math:`\bar o` it uses the scalar :math:`L(a) = \langle \bar o,
f(a)\rangle`, whose gradient is exactly what ``backward(ō, cache)`` returns:

- ``mode="directions"`` (fast): for random directions v of each argument,
  :math:`\frac{L(a + hv) - L(a - hv)}{2h} \approx \langle \nabla_a L, v\rangle`.
- ``mode="elementwise"``: the same with v running over every basis vector, so every entry
  of every gradient is checked and the worst one is located.
- ``mode="jacobian"`` (small inputs): the full Jacobian, column by column from central
  differences and row by row from ``backward`` with one-hot upstream gradients.

Each argument is checked on its own, and with its own rounding-noise estimate, so a wrong
gradient of a small parameter cannot hide behind a large one (see *Tolerance* below).
Perturbed inputs are always fresh arrays, never in-place edits.

Also checked, as in ``torch.autograd.gradcheck``: a zero upstream gradient gives zero
gradients; each gradient has its input's shape and dtype; backward is deterministic
(bit-identical on a second call); and neither the inputs nor the upstream gradient are
mutated.

Tolerance
---------
A finite difference D = (L(a + hv) − L(a − hv)) / 2h differs from the derivative by a
truncation error, O(h²), and a rounding error: each output entry is rounded to a few ulps,
which after the division by 2h is of order ε|ō ⊙ f(a)|/h (ε = 2.2e-16). With h = 1e-6
and unit-scale data both are around 1e-10. D is formed as ⟨ō, f(a + hv) − f(a − hv)⟩/2h,
so the two outputs cancel entry by entry before anything is summed.

A comparison passes when

.. math::

    |D - \langle\nabla_a L, v\rangle| \le \text{atol} + \text{rtol}\cdot\max(|D|,
    |\langle\nabla_a L, v\rangle|) + \text{noise}_v.

noise_v is 0 unless the comparison fails without it. It then estimates the error of this
very difference, from the function itself: 4 × the largest change of D when the step
becomes 1.25h, 1.5h and 2h (rounding errors are different at each step, truncation grows
with h), plus ε Σ|ōᵢ fᵢ(a)|/h over the output entries that did not change at all (a
change below one ulp is invisible). It never exceeds the bound 8ε Σ|ō ⊙ f(a)|/h on the
rounding error of the whole output (:attr:`GradcheckResult.noise`), which is what a
gradient exactly zero in exact arithmetic needs (the gradient of a bias before
training-mode batch norm, say). An argument that changes the output by much less than
another therefore gets a much smaller allowance: a 0.1 % error in a small bias gradient
fails even when the residual path makes the output, and the bound, large.

The limit: a directional derivative below the resolution of the finite difference (a
change of L smaller than the rounding of the outputs it moves) cannot be checked, and
passes. Points where the function is not differentiable (ReLU at 0, max-pool ties) make
finite differences meaningless: draw data away from them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._backend import Array, namespace, new_array, one_hot_like, to_numpy
from ._table import format_table
from .config import is_integer

__all__ = ["ArgReport", "GradcheckError", "GradcheckResult", "gradcheck", "gradcheck_block"]

MODES = ("directions", "elementwise", "jacobian")
EPS64 = float(np.finfo(np.float64).eps)
#: Steps, as multiples of h, at which a suspect difference is evaluated again to estimate
#: its error, and the factor on the largest change seen.
NOISE_STEPS = (1.25, 1.5, 2.0)
NOISE_SAFETY = 4.0


class GradcheckError(AssertionError):
    """Raised by :func:`gradcheck` when a check fails; carries the :class:`GradcheckResult`."""

    def __init__(self, result: GradcheckResult) -> None:
        super().__init__(str(result))
        self.result = result


@dataclass(frozen=True)
class ArgReport:
    """The numerical-versus-analytical comparison for one argument.

    Attributes
    ----------
    name : str
    max_abs_err : float
        Largest |numerical − analytical| over the directions or entries checked.
    max_rel_err : float
        Largest |numerical − analytical| / max(|numerical|, |analytical|, (atol+noise)/rtol),
        with each comparison's own noise allowance.
    where : tuple of int or None
        Index of the worst entry (``elementwise`` and ``jacobian`` modes, or a failing
        ``directions`` check that could be localised); None otherwise.
    passed : bool
        Every comparison satisfied |num − ana| ≤ atol + rtol·max(|num|, |ana|) + noise.
    noise : float
        The largest rounding-noise allowance a comparison of this argument needed (0 when
        each passed without one); see the module docstring.
    """

    name: str
    max_abs_err: float
    max_rel_err: float
    where: tuple[int, ...] | None
    passed: bool
    noise: float = 0.0


@dataclass(frozen=True)
class GradcheckResult:
    """Outcome of :func:`gradcheck`: per-argument reports and the extra checks' failures."""

    mode: str
    args: dict[str, ArgReport]
    failures: list[str] = field(default_factory=list)
    noise: float = 0.0  # 8 ε Σ|ō ⊙ f(a)| / h: the most any comparison may add to atol

    @property
    def ok(self) -> bool:
        """True when every argument and every extra check passed."""
        return not self.failures and all(r.passed for r in self.args.values())

    @property
    def max_rel_err(self) -> float:
        """The largest relative error over all arguments."""
        return max((r.max_rel_err for r in self.args.values()), default=0.0)

    def __str__(self) -> str:
        header = ["argument", "max abs err", "max rel err", "noise", "status", "where"]
        rows = [
            [
                r.name,
                f"{r.max_abs_err:.2e}",
                f"{r.max_rel_err:.2e}",
                f"{r.noise:.1e}" if r.noise else "-",
                "ok" if r.passed else "FAIL",
                "" if r.where is None else str(r.where),
            ]
            for r in self.args.values()
        ]
        lines = [
            f"gradcheck ({self.mode}): {'PASS' if self.ok else 'FAIL'}",
            "ok: |numerical − analytical| ≤ atol + rtol·max(|numerical|, |analytical|) + noise,",
            "noise: the allowance for rounding an argument needed, at most "
            f"{self.noise:.1e} (8ε Σ|dout·out|/h)",
        ]
        if rows:
            lines += format_table(header, rows, align="<>>><<")
        lines += [f"FAIL: {msg}" for msg in self.failures]
        return "\n".join(lines)


ForwardFn = Callable[[dict[str, Array]], tuple[Array, Any]]
BackwardFn = Callable[[Array, Any], Mapping[str, Array]]


def gradcheck(
    forward: ForwardFn,
    backward: BackwardFn,
    inputs: Mapping[str, Array],
    *,
    wrt: Sequence[str] | None = None,
    mode: str = "directions",
    n_directions: int = 3,
    eps: float = 1e-6,
    rtol: float = 1e-5,
    atol: float = 1e-7,
    rng: int | np.random.Generator | None = 0,
    dout: Array | None = None,
    locate_up_to: int = 4096,
    raise_on_failure: bool = True,
) -> GradcheckResult:
    """Check ``backward`` against central differences of ``forward`` in float64.

    Parameters
    ----------
    forward : callable
        ``forward(inputs: dict[str, array]) -> (out, cache)``.
    backward : callable
        ``backward(dout, cache) -> mapping`` with a gradient for every name in ``wrt``.
    inputs : mapping
        Name -> float64 array. Inputs not in ``wrt`` (buffers, say) are passed unchanged.
    wrt : sequence of str, optional
        The inputs to check. Default: all of them.
    mode : {"directions", "elementwise", "jacobian"}
        See the module docstring.
    n_directions : int
        Random directions per argument in ``"directions"`` mode.
    eps : float
        Finite-difference step h (> 0).
    rtol, atol : float
        A comparison passes when |num − ana| ≤ atol + rtol·max(|num|, |ana|) + noise, with
        rtol > 0 and atol ≥ 0; noise is the comparison's own rounding-noise allowance, 0
        unless it fails without one (see the module docstring).
    rng : int or numpy.random.Generator
        Seed for the upstream gradient and the directions (drawn with NumPy).
    dout : array, optional
        Upstream gradient; default random normal (never all ones, which hides
        transposition errors).
    locate_up_to : int
        In ``"directions"`` mode, a failing argument with at most this many entries is
        re-checked entry by entry to report where the error is.
    raise_on_failure : bool
        Raise :class:`GradcheckError` (an AssertionError) on failure; else just return.

    Returns
    -------
    GradcheckResult
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _check_settings(eps=eps, rtol=rtol, atol=atol, n_directions=n_directions)
    inputs = dict(inputs)
    wrt = list(inputs) if wrt is None else list(wrt)
    unknown = [n for n in wrt if n not in inputs]
    if unknown:
        raise ValueError(f"wrt names {unknown} that are not inputs; inputs are {list(inputs)}")
    for name, value in inputs.items():
        xp = namespace(value)
        if xp.isdtype(value.dtype, "real floating") and value.dtype != xp.float64:
            raise TypeError(
                f"gradcheck needs float64 inputs (finite differences in lower precision are "
                f"meaningless); got {value.dtype} for {name!r}"
            )
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    snapshot = {n: to_numpy(v).copy() for n, v in inputs.items()}

    out, cache = forward(dict(inputs))
    if dout is None:
        dout = new_array(gen.standard_normal(tuple(out.shape)), out)
    dout_snapshot = to_numpy(dout).copy()
    grads = dict(backward(dout, cache))
    failures = _structure_checks(inputs, wrt, grads)
    if failures:  # missing gradients, or gradients of the wrong shape, cannot be compared
        result = GradcheckResult(mode=mode, args={}, failures=failures)
        if raise_on_failure:
            raise GradcheckError(result)
        return result

    # The rounding error of the whole output: each entry is off by a few ulps, and the
    # difference is divided by 2h. The most any comparison may add to atol.
    xp_out = namespace(out)
    noise = 8 * EPS64 * float(xp_out.sum(xp_out.abs(out * dout))) / eps
    diff = _Differences(forward, inputs, dout, eps, noise)

    reports: dict[str, ArgReport] = {}
    for name in wrt:
        a, ga = inputs[name], grads[name]
        if mode == "directions":
            vs = [new_array(gen.standard_normal(tuple(a.shape)), a) for _ in range(n_directions)]
            ana = np.array([float(namespace(ga).sum(ga * v)) for v in vs])
            report = _along(name, vs.__getitem__, len(vs), ana, None, diff, rtol, atol, noise)
            if not report.passed and a.size <= locate_up_to:
                report = _elementwise(name, a, ga, diff, rtol, atol, noise)
        elif mode == "elementwise":
            report = _elementwise(name, a, ga, diff, rtol, atol, noise)
        else:
            report = _jacobian(name, a, backward, cache, out, diff, rtol, atol)
        reports[name] = report

    failures += _behaviour_checks(forward, backward, inputs, wrt, out, cache, dout, grads)
    for name, before in snapshot.items():
        if not np.array_equal(before, to_numpy(inputs[name]), equal_nan=True):
            failures.append(f"input {name!r} was mutated by forward or backward")
    if not np.array_equal(dout_snapshot, to_numpy(dout), equal_nan=True):
        failures.append("the upstream gradient was mutated by backward")

    result = GradcheckResult(mode=mode, args=reports, failures=failures, noise=noise)
    if raise_on_failure and not result.ok:
        raise GradcheckError(result)
    return result


def _check_settings(*, eps: Any, rtol: Any, atol: Any, n_directions: Any) -> None:
    """The step, the tolerances and the number of directions must be usable numbers."""
    for name, value, low in (("eps", eps, "> 0"), ("rtol", rtol, "> 0"), ("atol", atol, ">= 0")):
        if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be a finite float {low}, got {value!r}")
        ok = value > 0 if low == "> 0" else value >= 0
        if not (math.isfinite(value) and ok):
            raise ValueError(f"{name} must be a finite float {low}, got {value!r}")
    if not is_integer(n_directions) or n_directions < 1:
        raise ValueError(f"n_directions must be an int >= 1, got {n_directions!r}")


class _Differences:
    """Central differences of L(a) = ⟨ō, f(a)⟩ along a direction, and their error estimate."""

    def __init__(
        self, forward: ForwardFn, inputs: dict[str, Array], dout: Array, eps: float, cap: float
    ) -> None:
        self.forward, self.inputs, self.dout, self.eps, self.cap = forward, inputs, dout, eps, cap

    def outputs(self, name: str, v: Array, step: float) -> tuple[Array, Array]:
        """f(a + step·v) and f(a − step·v), a = inputs[name]."""
        a = self.inputs[name]
        plus, _ = self.forward({**self.inputs, name: a + step * v})
        minus, _ = self.forward({**self.inputs, name: a - step * v})
        return plus, minus

    def __call__(self, name: str, v: Array, step: float | None = None) -> tuple[float, float]:
        """(D, hidden): D = ⟨ō, f(a + hv) − f(a − hv)⟩ / 2h, and ε Σ|ōᵢ fᵢ(a)| / h over
        the output entries that did not change: what a change below one ulp can hide."""
        step = self.eps if step is None else step
        plus, minus = self.outputs(name, v, step)
        xp = namespace(plus)
        d = float(xp.sum(self.dout * (plus - minus))) / (2 * step)
        same = xp.astype(plus == minus, plus.dtype)
        hidden = EPS64 * float(xp.sum(xp.abs(self.dout * plus) * same)) / step
        return d, hidden

    def allowance(self, name: str, v: Array, d: float, hidden: float) -> float:
        """The rounding-noise allowance of the difference ``d`` along ``v`` (see the module
        docstring): the change of D at other steps, and what unchanged entries can hide."""
        spread = max(abs(self(name, v, f * self.eps)[0] - d) for f in NOISE_STEPS)
        return min(self.cap, NOISE_SAFETY * spread + hidden)


def _compare(
    name: str,
    num: np.ndarray,
    ana: np.ndarray,
    shape: tuple[int, ...] | None,
    rtol: float,
    atol: float,
    cap: float,
    allowance: Callable[[int], float],
) -> ArgReport:
    """Compare entry by entry; ``allowance(k)`` (flat index k) is asked only for entries
    that fail without a noise allowance but could pass with the largest, ``cap``."""
    err = np.abs(num - ana)
    mag = np.maximum(np.abs(num), np.abs(ana))
    strict = atol + rtol * mag
    allow = np.zeros(err.shape)
    flat = allow.reshape(-1)
    suspect = (err > strict) & (err <= strict + cap)
    for k in np.flatnonzero(suspect):
        flat[k] = allowance(int(k))
    rel = err / np.maximum(mag, (atol + allow) / rtol)
    worst = int(np.argmax(rel)) if rel.size else 0
    where = tuple(int(i) for i in np.unravel_index(worst, shape)) if shape is not None else None
    return ArgReport(
        name=name,
        max_abs_err=float(err.max(initial=0.0)),
        max_rel_err=float(rel.max(initial=0.0)),
        where=where if rel.size else None,
        passed=bool(np.all(err <= strict + allow)),
        noise=float(allow.max(initial=0.0)),
    )


def _along(
    name: str,
    direction: Callable[[int], Array],
    count: int,
    ana: np.ndarray,
    shape: tuple[int, ...] | None,
    diff: _Differences,
    rtol: float,
    atol: float,
    cap: float,
) -> ArgReport:
    """Compare the differences along ``direction(k)``, k < ``count``, with ``ana``."""
    num, hidden = zip(*(diff(name, direction(k)) for k in range(count)), strict=True)

    def allowance(k: int) -> float:
        return diff.allowance(name, direction(k), num[k], hidden[k])

    return _compare(name, np.array(num), ana, shape, rtol, atol, cap, allowance)


def _elementwise(
    name: str, a: Array, ga: Array, diff: _Differences, rtol: float, atol: float, cap: float
) -> ArgReport:
    """Along every basis vector: every entry of the gradient."""
    size = int(np.prod(a.shape))
    ana = to_numpy(ga).reshape(-1)

    def basis(i: int) -> Array:
        return one_hot_like(a, i)

    return _along(name, basis, size, ana, tuple(a.shape), diff, rtol, atol, cap)


def _jacobian(
    name: str,
    a: Array,
    backward: BackwardFn,
    cache: Any,
    out: Array,
    diff: _Differences,
    rtol: float,
    atol: float,
) -> ArgReport:
    """Every entry ∂f_k/∂a_i: columns from central differences, rows from ``backward`` with
    one-hot upstream gradients. An entry's rounding bound is 8 ε |f_k(a)| / h."""
    n_in = int(np.prod(a.shape))
    n_out = int(np.prod(out.shape))
    step = diff.eps

    def column(i: int, at: float) -> tuple[np.ndarray, np.ndarray]:
        plus, minus = (to_numpy(o).reshape(-1) for o in diff.outputs(name, one_hot_like(a, i), at))
        return (plus - minus) / (2 * at), plus == minus

    numerical = np.empty((n_out, n_in))
    unchanged = np.empty((n_out, n_in), dtype=bool)
    for i in range(n_in):  # column i: d out / d a_i by central differences
        numerical[:, i], unchanged[:, i] = column(i, step)
    analytical = np.empty((n_out, n_in))
    for k in range(n_out):  # row k: backward of a one-hot upstream gradient
        analytical[k, :] = to_numpy(backward(one_hot_like(out, k), cache)[name]).reshape(-1)
    magnitude = np.abs(to_numpy(out)).reshape(-1)
    caps = 8 * EPS64 * magnitude / step  # per output entry
    spreads: dict[int, np.ndarray] = {}

    def allowance(flat: int) -> float:
        k, i = divmod(flat, n_in)
        if i not in spreads:  # the whole column again at the other steps, once
            base = numerical[:, i]
            spreads[i] = np.max([np.abs(column(i, f * step)[0] - base) for f in NOISE_STEPS], 0)
        hidden = EPS64 * magnitude[k] / step if unchanged[k, i] else 0.0
        return float(min(caps[k], NOISE_SAFETY * spreads[i][k] + hidden))

    cap = float(caps.max(initial=0.0))
    return _compare(name, numerical, analytical, (n_out, *a.shape), rtol, atol, cap, allowance)


def _structure_checks(
    inputs: dict[str, Array], wrt: list[str], grads: dict[str, Array]
) -> list[str]:
    """A gradient for every argument, with the argument's shape and dtype."""
    failures = []
    for name in wrt:
        if name not in grads:
            failures.append(f"backward returned no gradient for {name!r}")
            continue
        g, a = grads[name], inputs[name]
        if tuple(g.shape) != tuple(a.shape):
            failures.append(f"gradient of {name!r} has shape {tuple(g.shape)}, input {a.shape}")
        if g.dtype != a.dtype:
            failures.append(f"gradient of {name!r} has dtype {g.dtype}, input {a.dtype}")
    return failures


def _behaviour_checks(
    forward: ForwardFn,
    backward: BackwardFn,
    inputs: dict[str, Array],
    wrt: list[str],
    out: Array,
    cache: Any,
    dout: Array,
    grads: dict[str, Array],
) -> list[str]:
    """Zero in, zero out; deterministic backward and forward."""
    failures = []
    xp = namespace(out)
    zero = backward(xp.zeros_like(dout), cache)
    for name in wrt:
        if not bool(xp.all(zero[name] == 0)):
            failures.append(f"a zero upstream gradient gave a non-zero gradient for {name!r}")
    again = backward(dout, cache)
    for name in wrt:
        if not np.array_equal(to_numpy(grads[name]), to_numpy(again[name]), equal_nan=True):
            failures.append(f"backward is not deterministic: {name!r} differs on a second call")
    out2, _ = forward(dict(inputs))
    if not np.array_equal(to_numpy(out), to_numpy(out2), equal_nan=True):
        failures.append("forward is not deterministic: a second call gave different output")
    return failures


def gradcheck_block(
    cfg: Any,
    x: Array,
    params: Mapping[str, Array],
    *,
    training: bool = True,
    wrt: Sequence[str] | None = None,
    chunk_size: int | None = None,
    threads: int | None = None,
    **kwargs: Any,
) -> GradcheckResult:
    """:func:`gradcheck` of the whole block, on x and every trainable parameter.

    Parameters
    ----------
    cfg : NonLocalConfig
    x, params : arrays in float64
    training : bool
        Batch-norm mode for the forward.
    wrt : sequence of str, optional
        Default ``["x", *nlref.trainable_names(cfg)]``.
    chunk_size, threads : int or None
        Passed to :func:`nlref.forward`: check the chunked or the threaded path.
    **kwargs
        Passed to :func:`gradcheck` (``mode``, ``rtol``, ``rng``, ...).
    """
    from .api import backward, forward
    from .params import trainable_names

    names = list(params)

    def fwd(inp: dict[str, Array]) -> tuple[Array, Any]:
        return forward(
            inp["x"],
            {n: inp[n] for n in names},
            cfg,
            training=training,
            chunk_size=chunk_size,
            threads=threads,
        )

    def bwd(dz: Array, cache: Any) -> dict[str, Array]:
        dx, grads = backward(dz, cache)
        return {"x": dx, **grads}

    if wrt is None:
        wrt = ["x", *trainable_names(cfg)]
    return gradcheck(fwd, bwd, {"x": x, **params}, wrt=wrt, **kwargs)
