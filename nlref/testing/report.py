"""The oracle's reports: :class:`Row` (one tensor), :class:`Report` (one module) and
:class:`ModelReport` (every block of a model). ``str()`` of each is a readable table."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .._table import format_table

__all__ = ["STATUSES", "ModelReport", "ModelRow", "Report", "Row"]

#: ``"not captured"``: the oracle could not read the module's tensor (the module raised
#: before computing it, or its probe never fired); ``"frozen"``: a parameter with
#: ``requires_grad=False``, which has no gradient to compare.
STATUSES = ("ok", "FAIL", "not captured", "frozen")


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
    status : {"ok", "FAIL", "not captured", "frozen"}
        See :data:`STATUSES`; ``detail`` says why a row was not captured.
    max_abs_err, max_rel_err : float or None
        ``max |module − nlref|``, and that relative to nlref: in float64
        ``max |module − nlref| / max(|nlref|, atol/rtol)``; in low precision
        ``max |module − nlref| / max |nlref|``. None when not compared.
    magnitude : float or None
        ``max |nlref|``, to judge the errors against; 0 for a vacuous row.
    where : tuple of int or None
        Index of the largest error.
    detail : str
        Why a row failed or was not compared.
    expected_err : float or None
        In low precision: the error an honest implementation in that precision makes on
        this tensor (nlref in float32, or nlref emulating float16 / bfloat16).
    allowed_err : float or None
        In low precision: the largest ``max_abs_err`` that passes (the factor times
        ``expected_err``).
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
    expected_err: float | None = None
    allowed_err: float | None = None

    @property
    def ok(self) -> bool:
        """True when the tensor was compared and matched."""
        return self.status == "ok"

    @property
    def compared(self) -> bool:
        """True when the module's tensor was compared with nlref's."""
        return self.status in ("ok", "FAIL")

    @property
    def vacuous(self) -> bool:
        """True when nlref's tensor is identically zero: a match checks nothing."""
        return self.compared and self.magnitude == 0.0

    @property
    def ratio(self) -> float | None:
        """In low precision, ``max_abs_err / expected_err``."""
        if self.expected_err is None or self.max_abs_err is None:
            return None
        return self.max_abs_err / self.expected_err


@dataclass(frozen=True)
class Report:
    """The outcome of :func:`nlref.testing.compare`; ``str(report)`` is a readable table.

    Attributes
    ----------
    layout : str
        The layout's name (``"custom"`` for an unregistered :class:`Layout`).
    module : str
        The module's class.
    cfg : NonLocalConfig, GCNetConfig or DNLConfig
        What nlref read from the module.
    input_shape : tuple of int
    training : bool
    rtol, atol : float
        The float64 tolerances.
    rows : tuple of Row
        In the order the computation produces them: forward tensors, BN buffers, then the
        gradients in the order backward reaches them, dx last.
    module_error : str or None
        The module's exception (type and message) if its forward or backward raised.
    module_error_stage : {"forward", "backward", None}
    notes : tuple of str
        For example which tensors the module does not expose.
    dtype : {"float64", "float32", "float16", "bfloat16"}
        The precision the module ran in.
    factor : float or None
        In low precision: a tensor passes when its error is at most ``factor`` times the
        expected error.
    randomized : bool
        The comparison ran on a randomised copy of the module.
    diagnosis : str or None
        When the module differs: the conventions which, changed in nlref, make it match
        (at most two changes); None when it matches or when nothing explains it.
    summary : str
        The config line.
    """

    layout: str
    module: str
    cfg: Any
    input_shape: tuple[int, ...]
    training: bool
    rtol: float
    atol: float
    rows: tuple[Row, ...]
    module_error: str | None = None
    module_error_stage: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    dtype: str = "float64"
    factor: float | None = None
    randomized: bool = False
    diagnosis: str | None = None
    summary: str = ""

    @property
    def ok(self) -> bool:
        """True when the module ran forward and backward and every compared tensor matched."""
        compared = [r for r in self.rows if r.compared]
        failed = any(r.status == "FAIL" for r in self.rows)
        return self.module_error is None and bool(compared) and not failed

    @property
    def first_divergence(self) -> str | None:
        """The name of the first row (in computation order) whose values differ, or None."""
        return next((r.name for r in self.rows if r.status == "FAIL"), None)

    @property
    def vacuous(self) -> tuple[str, ...]:
        """The rows whose nlref tensor is identically zero: their match checks nothing
        (for example every gradient upstream of a zero-initialised W_z or BN γ)."""
        return tuple(r.name for r in self.rows if r.vacuous)

    @property
    def worst(self) -> Row | None:
        """The compared row with the largest relative error (in low precision: the
        largest error relative to the expected one)."""
        compared = [r for r in self.rows if r.max_rel_err is not None]
        if self.dtype != "float64":
            return max(compared, key=lambda r: r.ratio or 0.0, default=None)
        return max(compared, key=lambda r: r.max_rel_err, default=None)

    def row(self, name: str) -> Row:
        """The row called ``name``.

        Raises
        ------
        KeyError
            If there is none; the message lists the rows.
        """
        return _find(self.rows, "name", name, "row")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the report."""
        return {
            "layout": self.layout,
            "module": self.module,
            "config": self.cfg.to_dict(),
            "input_shape": list(self.input_shape),
            "training": self.training,
            "dtype": self.dtype,
            "rtol": self.rtol,
            "atol": self.atol,
            "factor": self.factor,
            "randomized": self.randomized,
            "ok": self.ok,
            "first_divergence": self.first_divergence,
            "vacuous": list(self.vacuous),
            "diagnosis": self.diagnosis,
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
                    "expected_err": r.expected_err,
                    "allowed_err": r.allowed_err,
                    "where": None if r.where is None else list(r.where),
                    "detail": r.detail,
                }
                for r in self.rows
            ],
        }

    def __str__(self) -> str:
        low = self.dtype != "float64"
        copy = ", a randomised copy" if self.randomized else ""
        if low:
            rule = (
                f"run in {self.dtype}; a tensor passes when max |module − nlref float64| ≤ "
                f"{self.factor:g} × the error of nlref in {self.dtype} (expected err)"
            )
        else:
            rule = (
                "a tensor passes when |module − nlref| ≤ max(rtol·|nlref|, atol), rtol "
                f"{self.rtol:g}, atol {self.atol:g}"
            )
        head = [
            f"nlref oracle: {self.module} (layout {self.layout}{copy}) vs nlref, {self.dtype}",
            self.summary,
            f"input: x {self.input_shape}, training={self.training}; {rule}",
            "",
        ]
        header = ["step", "tensor", "module", "shape", "max |nlref|", "max abs err"]
        header += ["expected err", "err/expected"] if low else ["max rel err"]
        header.append("status")
        body = []
        for r in self.rows:
            line = [r.stage, r.name, r.source, "x".join(map(str, r.shape)) or "()"]
            line += [_e(r.magnitude), _e(r.max_abs_err)]
            if low:
                ratio = r.ratio
                line += [_e(r.expected_err), "-" if ratio is None else f"{ratio:.2g}"]
            else:
                line.append(_e(r.max_rel_err))
            line.append(r.status + (f" ({r.detail})" if r.detail and r.status != "ok" else ""))
            body.append(line)
        align = "<<<<" + ">" * (len(header) - 5) + "<"
        lines = [*head, *format_table(header, body, align=align), ""]
        lines += [f"note: {n}" for n in self.notes]
        if self.vacuous:
            lines.append(
                f"warning: {len(self.vacuous)} tensors are identically zero in nlref, so their "
                f"match checks nothing (vacuous): {', '.join(self.vacuous)}. Compare a "
                "randomised copy (compare(..., randomize=True)) to check them"
            )
        if self.module_error is not None:
            lines.append(f"module error in {self.module_error_stage}: {self.module_error}")
        lines.append(self.verdict())
        if self.diagnosis is not None:
            lines.append(self.diagnosis)
        return "\n".join(lines)

    def verdict(self) -> str:
        """The one-line conclusion of ``str(report)`` (before the diagnosis)."""
        compared = [r for r in self.rows if r.compared]
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
        if self.dtype != "float64":
            return (
                f"PASS: {len(compared)} tensors match in {self.dtype} (worst {worst.ratio:.2g} × "
                f"the expected error: {worst.name})"
            )
        return (
            f"PASS: {len(compared)} tensors match (worst max rel err "
            f"{_e(worst.max_rel_err)}: {worst.name})"
        )


@dataclass(frozen=True)
class ModelRow:
    """One block of a model checked by :func:`nlref.testing.check_model`.

    Attributes
    ----------
    path : str
        The block's dotted path in the model (``""`` for the model itself).
    layout : str
    module : str
        The block's class.
    report : Report or None
        The block's full comparison; None when it could not run (see ``error``).
    error : str or None
        Why the block was not compared (the model never called it, or its config could
        not be read).
    family : str
        The block's family (its layout's): ``"nonlocal"``, ``"gcnet"`` or ``"dnl"``.
    """

    path: str
    layout: str
    module: str
    report: Report | None = None
    error: str | None = None
    family: str = "nonlocal"

    @property
    def ok(self) -> bool:
        """The block was compared and matched."""
        return self.report is not None and self.report.ok

    @property
    def worst(self) -> Row | None:
        """The block's worst row."""
        return None if self.report is None else self.report.worst

    @property
    def first_divergence(self) -> str | None:
        """The block's first diverging tensor."""
        return None if self.report is None else self.report.first_divergence


@dataclass(frozen=True)
class ModelReport:
    """The outcome of :func:`nlref.testing.check_model`: one row per recognised block.

    ``str()`` is a table; ``ok`` is True when every block matched; each row's full
    :class:`Report` is ``rows[i].report`` (or :meth:`block`).
    """

    model: str
    rows: tuple[ModelRow, ...]

    @property
    def ok(self) -> bool:
        """True when every block was compared and matched."""
        return bool(self.rows) and all(r.ok for r in self.rows)

    def block(self, path: str) -> ModelRow:
        """The row of the block at ``path``.

        Raises
        ------
        KeyError
            If there is none; the message lists the blocks.
        """
        return _find(self.rows, "path", path, "block")

    def __str__(self) -> str:
        header = ["block", "layout", "module", "dtype", "status", "worst err", "first divergence"]
        body = []
        for r in self.rows:
            rep = r.report
            if rep is None:
                status, worst, dtype = "not compared", "-", "-"
            else:
                status = "ok" if rep.ok else "FAIL"
                w = rep.worst
                dtype = rep.dtype
                if w is None:
                    worst = "-"
                elif rep.dtype != "float64":
                    worst = f"{w.ratio:.2g}× expected ({w.name})"
                else:
                    worst = f"{_e(w.max_rel_err)} ({w.name})"
            first = r.first_divergence or "-"
            body.append([r.path or "(model)", r.layout, r.module, dtype, status, worst, first])
        families = {r.family for r in self.rows}
        kind = "Non-local blocks" if families <= {"nonlocal"} else "blocks"
        lines = [f"nlref oracle: {len(self.rows)} {kind} of {self.model}", ""]
        lines += format_table(header, body, align="<<<<<<<")
        lines.append("")
        for r in self.rows:
            if r.error is not None:
                lines.append(f"{r.path or '(model)'}: not compared: {r.error}")
            elif r.report is not None and r.report.diagnosis:
                lines.append(f"{r.path or '(model)'}: {r.report.diagnosis}")
        failed = [r for r in self.rows if not r.ok]
        if failed:
            lines.append(f"FAIL: {len(failed)} of {len(self.rows)} blocks do not match nlref")
        else:
            lines.append(f"PASS: all {len(self.rows)} blocks match nlref")
        return "\n".join(lines)


def _find(rows: tuple[Any, ...], key: str, value: str, what: str) -> Any:
    """The row whose ``key`` is ``value``, or a KeyError listing them all."""
    for r in rows:
        if getattr(r, key) == value:
            return r
    raise KeyError(f"no {what} {value!r}; {what}s: {[getattr(r, key) for r in rows]}")


def _e(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1e}" if math.isfinite(v) else str(v)


def _finite_or_none(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None
