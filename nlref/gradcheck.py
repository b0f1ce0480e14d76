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

Each argument is checked on its own, so a wrong gradient of a small parameter cannot hide
behind a large one. Perturbed inputs are always fresh arrays, never in-place edits.

Also checked, as in ``torch.autograd.gradcheck``: a zero upstream gradient gives zero
gradients; each gradient has its input's shape and dtype; backward is deterministic
(bit-identical on a second call); and neither the inputs nor the upstream gradient are
mutated.

Truncation error of central differences is O(h²) and rounding error O(ε|L|/h); with
h = 1e-6 in float64 both are around 1e-10 for unit-scale data. Points where the function
is not differentiable (ReLU at 0, max-pool ties) make finite differences meaningless:
draw data away from them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._backend import Array, namespace, new_array, one_hot_like, to_numpy

__all__ = ["ArgReport", "GradcheckError", "GradcheckResult", "gradcheck", "gradcheck_block"]

MODES = ("directions", "elementwise", "jacobian")


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
        Largest |numerical − analytical| / max(|numerical|, |analytical|, (atol+noise)/rtol).
    where : tuple of int or None
        Index of the worst entry (``elementwise`` and ``jacobian`` modes, or a failing
        ``directions`` check that could be localised); None otherwise.
    passed : bool
        Every comparison satisfied |num − ana| ≤ atol + rtol·max(|num|, |ana|).
    """

    name: str
    max_abs_err: float
    max_rel_err: float
    where: tuple[int, ...] | None
    passed: bool


@dataclass(frozen=True)
class GradcheckResult:
    """Outcome of :func:`gradcheck`: per-argument reports and the extra checks' failures."""

    mode: str
    args: dict[str, ArgReport]
    failures: list[str] = field(default_factory=list)
    noise: float = 0.0  # estimated rounding noise of one finite difference, added to atol

    @property
    def ok(self) -> bool:
        """True when every argument and every extra check passed."""
        return not self.failures and all(r.passed for r in self.args.values())

    @property
    def max_rel_err(self) -> float:
        """The largest relative error over all arguments."""
        return max((r.max_rel_err for r in self.args.values()), default=0.0)

    def __str__(self) -> str:
        width = max([len("argument"), *(len(n) for n in self.args)])
        lines = [
            f"gradcheck ({self.mode}): {'PASS' if self.ok else 'FAIL'} "
            f"(finite-difference noise estimate {self.noise:.1e}, added to atol)",
            f"{'argument':<{width}}  {'max abs err':>11}  {'max rel err':>11}  status  where",
        ]
        for r in self.args.values():
            where = "" if r.where is None else str(r.where)
            status = "ok" if r.passed else "FAIL"
            lines.append(
                f"{r.name:<{width}}  {r.max_abs_err:11.2e}  {r.max_rel_err:11.2e}  "
                f"{status:<6}  {where}"
            )
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
        Finite-difference step h.
    rtol, atol : float
        A comparison passes when |num − ana| ≤ atol + noise + rtol·max(|num|, |ana|), where
        noise = 8 ε Σ|ō ⊙ f(a)| / h estimates the rounding error of one central difference
        (ε = float64 machine epsilon). It matters only for gradients that are exactly zero
        (a bias before training-mode batch norm, say), which would otherwise fail on noise.
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

    # Rounding noise of a finite difference: L carries an absolute error of about
    # eps_mach * sum|dout * out| (more for ill-conditioned forwards), divided by 2h.
    xp_out = namespace(out)
    noise = 8 * float(np.finfo(np.float64).eps) * float(xp_out.sum(xp_out.abs(out * dout))) / eps
    atol = atol + noise

    def loss(perturbed: dict[str, Array]) -> float:
        o, _ = forward(perturbed)
        return float(namespace(o).sum(o * dout))

    def directional(name: str, v: Array) -> float:
        a = inputs[name]
        plus = loss({**inputs, name: a + eps * v})
        minus = loss({**inputs, name: a - eps * v})
        return (plus - minus) / (2 * eps)

    reports: dict[str, ArgReport] = {}
    for name in wrt:
        a, ga = inputs[name], grads[name]
        xp = namespace(a)
        if mode == "directions":
            num, ana = [], []
            for _ in range(n_directions):
                v = new_array(gen.standard_normal(tuple(a.shape)), a)
                num.append(directional(name, v))
                ana.append(float(xp.sum(ga * v)))
            report = _compare(name, np.array(num), np.array(ana), None, rtol, atol)
            if not report.passed and a.size <= locate_up_to:
                report = _elementwise(name, a, ga, directional, rtol, atol)
        elif mode == "elementwise":
            report = _elementwise(name, a, ga, directional, rtol, atol)
        else:
            report = _jacobian(name, a, inputs, forward, backward, cache, out, eps, rtol, atol)
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


def _compare(
    name: str,
    num: np.ndarray,
    ana: np.ndarray,
    shape: tuple[int, ...] | None,
    rtol: float,
    atol: float,
) -> ArgReport:
    err = np.abs(num - ana)
    mag = np.maximum(np.abs(num), np.abs(ana))
    rel = err / np.maximum(mag, atol / rtol)
    worst = int(np.argmax(rel)) if rel.size else 0
    where = tuple(int(i) for i in np.unravel_index(worst, shape)) if shape is not None else None
    return ArgReport(
        name=name,
        max_abs_err=float(err.max(initial=0.0)),
        max_rel_err=float(rel.max(initial=0.0)),
        where=where if rel.size else None,
        passed=bool(np.all(err <= atol + rtol * mag)),
    )


def _elementwise(
    name: str,
    a: Array,
    ga: Array,
    directional: Callable[[str, Array], float],
    rtol: float,
    atol: float,
) -> ArgReport:
    size = int(np.prod(a.shape))
    num = np.array([directional(name, one_hot_like(a, i)) for i in range(size)])
    ana = to_numpy(ga).reshape(-1)
    return _compare(name, num, ana, tuple(a.shape), rtol, atol)


def _jacobian(
    name: str,
    a: Array,
    inputs: dict[str, Array],
    forward: ForwardFn,
    backward: BackwardFn,
    cache: Any,
    out: Array,
    eps: float,
    rtol: float,
    atol: float,
) -> ArgReport:
    n_in = int(np.prod(a.shape))
    n_out = int(np.prod(out.shape))
    numerical = np.empty((n_out, n_in))
    for i in range(n_in):  # column i: d out / d a_i by central differences
        e = one_hot_like(a, i)
        plus, _ = forward({**inputs, name: a + eps * e})
        minus, _ = forward({**inputs, name: a - eps * e})
        numerical[:, i] = (to_numpy(plus) - to_numpy(minus)).reshape(-1) / (2 * eps)
    analytical = np.empty((n_out, n_in))
    for k in range(n_out):  # row k: backward of a one-hot upstream gradient
        analytical[k, :] = to_numpy(backward(one_hot_like(out, k), cache)[name]).reshape(-1)
    return _compare(name, numerical, analytical, (n_out, *a.shape), rtol, atol)


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
    from .block import backward, forward
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
