"""``nlref gradcheck``: gradient-check every pairwise variant and configuration.

Runs :func:`nlref.gradcheck_block` over every registered pairwise variant
(:func:`nlref.pairwise.names`) and a grid of block configurations, and prints one row per
case with the largest relative error of every tensor's gradient::

    nlref gradcheck                       # every variant x dims 1-3 x pooling, BN train
    nlref gradcheck --full                # also BN eval / no norm, no biases, scale 0.5
    nlref gradcheck --pairwise concatenation --dims 2 --mode elementwise
    nlref gradcheck --backend array_api_strict --json rows.json

The exit status is 0 when every case passes, 1 when any fails and 2 on a usage error
(an unknown option, a bad value such as ``--seed -1`` or ``--rtol 0``, or a backend that
cannot be imported).

Below the table, the output explains its cells and, where comparisons needed it, the
finite-difference noise floor: a comparison that fails only within the estimated rounding
noise of its difference gets that noise added to ``atol`` (:func:`nlref.gradcheck`), so
tolerances below the floor cannot make the check stricter than finite differences allow;
the output says so rather than refusing such tolerances.
"""

from __future__ import annotations

import argparse
import json
import math
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from .. import _table
from ..progress import progress
from . import BACKENDS, CLIError, load_backend

__all__ = [
    "SHAPES",
    "Case",
    "Row",
    "add_parser",
    "draw_case",
    "explain",
    "format_table",
    "iter_cases",
    "run_case",
    "summary",
]

#: Spatial shape of the input for each number of spatial dims (small: a few seconds in all).
SHAPES: dict[int, tuple[int, ...]] = {1: (7,), 2: (5, 6), 3: (3, 4, 5)}
BATCH = 2
IN_CHANNELS = 4
INTER_CHANNELS = 3
POOL_KERNEL = 2
FULL_SCALE = 0.5

#: Compact column labels for the parameter names of :func:`nlref.param_shapes`.
LABELS = {
    "theta": "θ",
    "phi": "φ",
    "g": "g",
    "z": "z",
    "concat.weight": "w_f",
    "bn.weight": "γ",
    "bn.bias": "β",
}
_LAYER_RANK = {"theta": 0, "phi": 1, "g": 2, "z": 4, "bn": 5}  # variant-own params: 3


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One gradient check: a block configuration, BN mode and input shape.

    Attributes
    ----------
    cfg : NonLocalConfig
    training : bool
        Batch-norm mode of the forward (irrelevant when ``cfg.norm`` is None).
    shape : tuple of int
        Full input shape (B, C, *S).
    """

    cfg: Any
    training: bool
    shape: tuple[int, ...]

    @property
    def spatial(self) -> tuple[int, ...]:
        """The spatial shape S."""
        return self.shape[2:]

    @property
    def norm_label(self) -> str:
        """``"train"``, ``"eval"`` (batch norm in that mode) or ``"none"``."""
        if self.cfg.norm is None:
            return "none"
        return "train" if self.training else "eval"

    def describe(self) -> str:
        """A one-line description, for failure reports."""
        cfg = self.cfg
        sub = "off" if cfg.sub_sample is None else f"{_x(cfg.sub_sample)} {cfg.pool_order}"
        return (
            f"{cfg.pairwise} S={_x(self.spatial)} sub_sample={sub} norm={self.norm_label} "
            f"biases={_bias_label(cfg.biases)} scale={cfg.scale}"
        )


@dataclass
class Row:
    """The outcome of one :class:`Case`.

    Attributes
    ----------
    case : Case
    tensors : tuple of str
        ``"x"`` and every trainable parameter of the case, in canonical order.
    rel_err, abs_err : dict
        Tensor name -> largest relative / absolute error (checked tensors only).
    failed : list of str
        Tensor names whose check failed.
    failures : list of str
        Failures of the extra checks (zero gradient, determinism, mutation, shapes).
    where : dict
        Tensor name -> index of the worst entry, where the check located one.
    error : str or None
        An exception raised while setting up or running the check.
    report : str
        The :class:`nlref.GradcheckResult` text of a failing check.
    noise : float
        The bound on the finite-difference rounding noise of the case
        (:attr:`nlref.GradcheckResult.noise`): the most any comparison may add to ``atol``.
    noise_used : float
        The largest rounding-noise allowance a comparison of the case needed (0 when each
        passed on ``atol`` and ``rtol`` alone).
    seconds : float
    """

    case: Case
    tensors: tuple[str, ...]
    rel_err: dict[str, float] = field(default_factory=dict)
    abs_err: dict[str, float] = field(default_factory=dict)
    where: dict[str, list[int] | None] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    error: str | None = None
    report: str = ""
    noise: float = 0.0
    noise_used: float = 0.0
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        """True when every tensor and every extra check passed and nothing raised."""
        return self.error is None and not self.failed and not self.failures

    @property
    def max_rel_err(self) -> float:
        """The largest relative error over the checked tensors."""
        return max(self.rel_err.values(), default=0.0)

    @property
    def status(self) -> str:
        """``"ok"``, ``"FAIL <labels>"`` or ``"ERROR"``."""
        if self.error is not None:
            return "ERROR"
        if self.passed:
            return "ok"
        what = [label(n) for n in self.failed]
        if self.failures:
            what.append("extra checks")
        return "FAIL " + ", ".join(what)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the case and its results."""
        cfg = self.case.cfg
        return {
            "pairwise": cfg.pairwise,
            "dims": len(self.case.spatial),
            "shape": list(self.case.shape),
            "in_channels": cfg.in_channels,
            "inter_channels": cfg.inter_channels,
            "sub_sample": None if cfg.sub_sample is None else list(cfg.sub_sample),
            "pool_order": cfg.pool_order if cfg.sub_sample is not None else None,
            "norm": cfg.norm,
            "training": self.case.training,
            "biases": list(cfg.biases),
            "scale": cfg.scale,
            "passed": self.passed,
            "status": self.status,
            "max_rel_err": {n: _finite_or_none(v) for n, v in self.rel_err.items()},
            "max_abs_err": {n: _finite_or_none(v) for n, v in self.abs_err.items()},
            "where": self.where,
            "failed": self.failed,
            "failures": self.failures,
            "error": self.error,
            "noise": self.noise,
            "noise_used": self.noise_used,
            "seconds": round(self.seconds, 4),
        }


def label(name: str) -> str:
    """The compact column label of a tensor name (``theta.weight`` -> ``θ.w``)."""
    if name in LABELS:
        return LABELS[name]
    layer, _, kind = name.partition(".")
    if layer in LABELS and kind in ("weight", "bias"):
        return f"{LABELS[layer]}.{kind[0]}"
    return name  # a future variant's own parameter: its full name


def _tensor_rank(name: str) -> tuple[int, int, str]:
    if name == "x":
        return (-1, 0, name)
    layer, _, kind = name.partition(".")
    return (_LAYER_RANK.get(layer, 3), 0 if kind == "weight" else 1, name)


def iter_cases(
    pairwise: Sequence[str],
    dims: Sequence[int],
    *,
    full: bool = False,
) -> Iterator[Case]:
    """The configurations checked by ``nlref gradcheck``.

    Parameters
    ----------
    pairwise : sequence of str
        Registered variant names.
    dims : sequence of int
        Numbers of spatial dims, each in {1, 2, 3} (shapes from :data:`SHAPES`).
    full : bool
        Default grid: sub_sample off, and on (kernel 2 per dim) with both pool orders; batch
        norm in training mode; all biases; no scale. ``full`` adds batch norm in eval mode
        and no norm, no biases, and scale 0.5 for variants that use a scale.

    Yields
    ------
    Case
    """
    from ..config import BIAS_LAYERS, POOL_ORDERS, NonLocalConfig
    from ..pairwise import get

    norms: list[tuple[str | None, bool]] = [("batchnorm", True)]
    bias_sets: list[tuple[str, ...]] = [BIAS_LAYERS]
    if full:
        norms += [("batchnorm", False), (None, True)]
        bias_sets.append(())
    for name in pairwise:
        scales: list[float | None] = [None]
        if full and get(name).uses_scale:
            scales.append(FULL_SCALE)
        for d in dims:
            spatial = SHAPES[d]
            pools: list[tuple[tuple[int, ...] | None, str]] = [(None, POOL_ORDERS[0])]
            pools += [((POOL_KERNEL,) * d, order) for order in POOL_ORDERS]
            for sub_sample, pool_order in pools:
                for norm, training in norms:
                    for biases in bias_sets:
                        for scale in scales:
                            cfg = NonLocalConfig(
                                in_channels=IN_CHANNELS,
                                inter_channels=INTER_CHANNELS,
                                pairwise=name,
                                scale=scale,
                                sub_sample=sub_sample,
                                pool_order=pool_order,
                                norm=norm,
                                biases=biases,
                            )
                            yield Case(cfg, training, (BATCH, IN_CHANNELS, *spatial))


def draw_case(case: Case, xp: Any, seed: int) -> tuple[dict[str, Any], Any]:
    """Random non-degenerate parameters and a smooth input for ``case``.

    See :func:`nlref.draw_smooth_case`: x stays away from max-pool ties and ReLU kinks, and
    parameters are redrawn when the concatenation ReLU would be nearly dead for every x.
    """
    from .. import draw_smooth_case

    return draw_smooth_case(case.cfg, case.shape, rng=seed, xp=xp)


def run_case(
    case: Case,
    xp: Any,
    *,
    mode: str,
    seed: int,
    rtol: float,
    atol: float,
) -> Row:
    """Gradient-check one case on the namespace ``xp``; never raises for a failing check.

    Parameters and x come from :func:`draw_case` (random, non-degenerate, away from
    max-pool ties and ReLU kinks), in float64; the upstream gradient and the directions
    from ``seed``. An exception while checking is recorded in :attr:`Row.error`.
    """
    from .. import gradcheck_block, trainable_names

    tensors = ("x", *trainable_names(case.cfg))
    row = Row(case=case, tensors=tensors)
    start = time.perf_counter()
    try:
        params, x = draw_case(case, xp, seed)
        result = gradcheck_block(
            case.cfg,
            x,
            params,
            training=case.training,
            mode=mode,
            rng=seed,
            rtol=rtol,
            atol=atol,
            raise_on_failure=False,
        )
    except Exception as err:  # a crash is a failed case, reported with the others
        row.error = f"{type(err).__name__}: {err}"
    else:
        row.noise = float(result.noise)
        row.noise_used = max((float(r.noise) for r in result.args.values()), default=0.0)
        for name, rep in result.args.items():
            row.rel_err[name] = rep.max_rel_err
            row.abs_err[name] = rep.max_abs_err
            row.where[name] = None if rep.where is None else list(rep.where)
            if not rep.passed:
                row.failed.append(name)
        row.failures = list(result.failures)
        if not result.ok:
            row.report = str(result)
    row.seconds = time.perf_counter() - start
    return row


# --------------------------------------------------------------------------- output


def _x(sizes: Sequence[int]) -> str:
    return "x".join(str(s) for s in sizes)


def _bias_label(biases: Sequence[str]) -> str:
    from ..config import BIAS_LAYERS

    if tuple(biases) == BIAS_LAYERS:
        return "all"
    return ",".join(biases) if biases else "none"


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _err(v: float) -> str:
    return f"{v:.1e}" if math.isfinite(v) else str(v)


def format_table(rows: Sequence[Row]) -> str:
    """The aligned table: configuration columns, one error column per tensor, status.

    Configuration columns that are the same in every row (norm, biases, scale under the
    default grid) are left out; the tensor columns are the union over the rows, in
    canonical order, with ``-`` where a tensor does not exist in that configuration.
    """
    tensors = sorted({t for r in rows for t in r.tensors}, key=_tensor_rank)
    config_cols: list[tuple[str, str, Any]] = [
        ("pairwise", "<", lambda r: r.case.cfg.pairwise),
        ("S", "<", lambda r: _x(r.case.spatial)),
        (
            "pool",
            "<",
            lambda r: "-" if r.case.cfg.sub_sample is None else _x(r.case.cfg.sub_sample),
        ),
        (
            "order",
            "<",
            lambda r: "-" if r.case.cfg.sub_sample is None else r.case.cfg.pool_order.split("_")[0],
        ),
    ]
    optional: list[tuple[str, str, Any]] = [
        ("norm", "<", lambda r: r.case.norm_label),
        ("bias", "<", lambda r: _bias_label(r.case.cfg.biases)),
        ("scale", ">", lambda r: "-" if r.case.cfg.scale is None else f"{r.case.cfg.scale:g}"),
    ]
    config_cols += [c for c in optional if len({c[2](r) for r in rows}) > 1]

    def cell(r: Row, t: str) -> str:
        if t not in r.tensors:
            return "-"
        if t not in r.rel_err:
            return "n/a"  # exists, but the check did not get that far
        return _err(r.rel_err[t]) + ("!" if t in r.failed else "")

    header = [c[0] for c in config_cols] + [label(t) for t in tensors] + ["status"]
    aligns = "".join(c[1] for c in config_cols) + ">" * len(tensors) + "<"
    body = [
        [c[2](r) for c in config_cols] + [cell(r, t) for t in tensors] + [r.status] for r in rows
    ]
    return "\n".join(_table.format_table(header, body, align=aligns))


def explain(rows: Sequence[Row], atol: float) -> str:
    """What the table's cells mean, and the rounding-noise floor the cases met."""
    text = [
        "Each cell: the largest relative error of that tensor's gradient, "
        "|numerical - analytical| / max(|numerical|, |analytical|, (atol + noise) / rtol), "
        "numerical from central differences in float64; '!' marks a failed tensor, '-' a "
        "tensor the configuration does not have."
    ]
    used = [r for r in rows if r.noise_used > 0]
    if used:
        worst = max(r.noise_used for r in used)
        text.append(
            f"Rounding noise: in {len(used)} of {len(rows)} cases a comparison passed only with "
            "the finite-difference noise allowance added to atol (largest "
            f"{worst:.1e}; --atol {atol:g}): an error below that noise floor cannot be seen by "
            "finite differences, whatever --rtol and --atol say, and the relative errors "
            "above are measured against (atol + noise) / rtol."
        )
    return "\n".join(line for t in text for line in textwrap.wrap(t, 100))


def format_failures(rows: Sequence[Row]) -> str:
    """Details of every failing case: the full :class:`nlref.GradcheckResult` report."""
    parts = []
    for r in rows:
        if r.passed:
            continue
        detail = r.error if r.error is not None else r.report
        parts.append(f"FAIL {r.case.describe()}\n{detail}")
    return "\n\n".join(parts)


def summary(rows: Sequence[Row], seconds: float) -> str:
    """The closing line: case count, time, worst relative error and PASS/FAIL."""
    n_fail = sum(not r.passed for r in rows)
    checked = [r for r in rows if r.rel_err]
    if checked:
        worst = max(checked, key=lambda r: r.max_rel_err)
        worst_name = max(worst.rel_err, key=worst.rel_err.__getitem__)
        worst_txt = (
            f"worst max rel err {_err(worst.max_rel_err)} "
            f"({label(worst_name)}, {worst.case.describe()})"
        )
    else:
        worst_txt = "no errors measured"
    verdict = "PASS" if n_fail == 0 else f"FAIL ({n_fail} of {len(rows)} cases failed)"
    return f"{len(rows)} cases in {seconds:.1f} s, {worst_txt}: {verdict}"


def _check_args(args: argparse.Namespace) -> None:
    """Refuse bad values with one line each (exit status 2), before any case runs."""
    if args.seed < 0:
        raise CLIError(f"--seed must be an int >= 0, got {args.seed}")
    if not (math.isfinite(args.rtol) and args.rtol > 0):
        raise CLIError(f"--rtol must be a finite number > 0, got {args.rtol:g}")
    if not (math.isfinite(args.atol) and args.atol >= 0):
        raise CLIError(f"--atol must be a finite number >= 0, got {args.atol:g}")


def _cmd_gradcheck(args: argparse.Namespace, out: TextIO) -> int:
    from .. import __version__
    from ..pairwise import names

    _check_args(args)
    xp = load_backend(args.backend)
    pairwise = list(dict.fromkeys(args.pairwise or names()))
    dims = list(dict.fromkeys(args.dims))
    cases = list(iter_cases(pairwise, dims, full=args.full))
    print(
        f"nlref {__version__} gradcheck: backend {args.backend}, mode {args.mode}, float64, "
        f"B={BATCH}, C={IN_CHANNELS}, C'={INTER_CHANNELS}, seed {args.seed}, "
        f"rtol {args.rtol:g}, atol {args.atol:g}, grid {'full' if args.full else 'default'}",
        file=out,
    )
    if not args.full:
        print("fixed: norm BN train, biases all, scale None (--full varies them)", file=out)
    print(file=out)
    start = time.perf_counter()
    bar = progress(cases, desc="gradcheck", unit="case", enabled=False if args.quiet else None)
    rows = [
        run_case(c, xp, mode=args.mode, seed=args.seed, rtol=args.rtol, atol=args.atol) for c in bar
    ]
    seconds = time.perf_counter() - start
    print(format_table(rows), file=out)
    print("\n" + explain(rows, args.atol), file=out)
    failures = format_failures(rows)
    if failures:
        print("\n" + failures, file=out)
    print("\n" + summary(rows, seconds), file=out)
    if args.json:
        doc = {
            "nlref_version": __version__,
            "backend": args.backend,
            "mode": args.mode,
            "seed": args.seed,
            "rtol": args.rtol,
            "atol": args.atol,
            "full": args.full,
            "cases": len(rows),
            "passed": all(r.passed for r in rows),
            "worst_rel_err": _finite_or_none(max((r.max_rel_err for r in rows), default=0.0)),
            "seconds": round(seconds, 3),
            "rows": [r.to_json() for r in rows],
        }
        try:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(doc, fh, indent=2, ensure_ascii=False)
                fh.write("\n")
        except OSError as err:
            raise CLIError(f"cannot write --json {args.json}: {err}") from err
        print(f"wrote {len(rows)} rows to {args.json}", file=out)
    return 0 if all(r.passed for r in rows) else 1


def add_parser(sub: Any) -> None:
    from ..gradcheck import MODES
    from ..pairwise import names

    p = sub.add_parser(
        "gradcheck",
        help="gradient-check every pairwise variant and configuration",
        description=(
            "Compare the hand-derived backward of the Non-local block with central "
            "differences in float64, for every registered pairwise variant x spatial dims "
            "x configuration, and print the max relative error of each tensor's gradient. "
            "Exit status 0 when all pass, 1 on any failure."
        ),
    )
    p.add_argument(
        "--pairwise",
        action="append",
        choices=names(),
        metavar="NAME",
        help=f"variant to check (repeatable; default all: {', '.join(names())})",
    )
    p.add_argument(
        "--dims",
        nargs="+",
        type=int,
        choices=sorted(SHAPES),
        default=sorted(SHAPES),
        metavar="D",
        help="numbers of spatial dims to check, from 1 2 3 (default all; shapes "
        + ", ".join(f"{d}: {_x(s)}" for d, s in SHAPES.items())
        + ")",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="also BN eval and no norm, no biases, and scale 0.5 (where the variant uses one)",
    )
    p.add_argument(
        "--backend",
        default="numpy",
        choices=BACKENDS,
        help="array library (default numpy)",
    )
    p.add_argument(
        "--mode",
        default="directions",
        choices=MODES,
        help="directions (fast, default), elementwise (every entry) or jacobian (full)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for params, x and directions (>= 0)")
    p.add_argument(
        "--rtol", type=float, default=1e-5, help="relative tolerance, > 0 (default 1e-5)"
    )
    p.add_argument(
        "--atol",
        type=float,
        default=1e-7,
        help="absolute tolerance, >= 0 (default 1e-7). Tolerances below the finite-difference "
        "noise floor are accepted, not refused: a comparison that fails only within the "
        "estimated rounding noise of its difference gets that noise added to atol, and the "
        "output says in how many cases and how large it was",
    )
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=_cmd_gradcheck)
