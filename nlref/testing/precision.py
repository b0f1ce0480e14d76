r"""The error an honest Non-local block makes in float32, float16 and bfloat16.

A module run in low precision differs from the float64 truth by its rounding errors. How
large they may be depends on the tensor (a gradient that is a sum over thousands of
products collects more than the values g), on the input, and on the format. So instead of
a fixed tolerance, the oracle measures, for each tensor, the error that a computation in
that precision makes on the same input and weights:

- **float32**: nlref itself, run in float32 (:func:`nlref.forward` and
  :func:`nlref.backward` accept float32);
- **float16, bfloat16**: a faithful emulation, built from nlref's own step functions
  (:func:`nlref.block.embed`, the variant's attention, :func:`nlref.block.project`, ...)
  run in float32, with every intermediate tensor rounded to the format between steps
  (the block family's ``emulate``, e.g. :func:`nlref.testing.nonlocal_block.emulate`).
  That is what GPU kernels and PyTorch's CPU kernels do: they store each tensor in the
  format and accumulate each sum in float32. The softmax variants round the logits
  before the softmax, and the softmax's output after it.

:func:`expected_errors` returns, per tensor, ``max |emulation − truth|``, with a floor of
the format's unit roundoff times the tensor's magnitude. :func:`nlref.testing.compare`
passes a module's tensor when its own error is at most :data:`FACTOR` times that: a
different order of summation, a fused kernel or a division in place of a multiplication
changes the error by a small factor, a wrong convention or a bug by orders of magnitude.

Nothing here uses autograd: the emulation calls nlref's hand-derived backward steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "FACTOR",
    "PRECISIONS",
    "UNIT_ROUNDOFF",
    "check_precision",
    "expected_errors",
    "round_to",
]

#: The formats :func:`nlref.testing.compare` runs a module in.
PRECISIONS = ("float64", "float32", "float16", "bfloat16")
#: u = 2^-p, half the distance from 1 to the next number of the format.
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
#: How many times the expected error a module's error may be, per format.
FACTOR = {"float32": 16.0, "float16": 16.0, "bfloat16": 16.0}


def check_precision(dtype: Any) -> str:
    """The name of ``dtype`` (a string, or a NumPy / torch dtype), one of :data:`PRECISIONS`.

    Raises
    ------
    ValueError
        For any other dtype.
    """
    name = str(dtype).removeprefix("torch.")
    if name not in PRECISIONS:
        raise ValueError(f"dtype must be one of {PRECISIONS}, got {dtype!r}")
    return name


def round_to(a: Any, fmt: str) -> np.ndarray:
    """``a`` rounded to ``fmt`` (round to nearest, ties to even), held in float32.

    float16 rounds through NumPy's float16 (overflow gives ±inf, as in the format);
    bfloat16, which NumPy lacks, keeps the top 16 bits of the float32 pattern after adding
    the rounding bias.
    """
    a32 = np.asarray(a, dtype=np.float32)
    if fmt == "float32":
        return a32
    if fmt == "float16":
        with np.errstate(over="ignore"):
            return a32.astype(np.float16).astype(np.float32)
    if fmt == "bfloat16":
        bits = np.ascontiguousarray(a32).view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        out = rounded.astype(np.uint32).view(np.float32)
        return np.where(np.isnan(a32), a32, out).reshape(a32.shape)
    raise ValueError(f"round_to rounds to float32, float16 or bfloat16, got {fmt!r}")


def expected_errors(
    fmt: str,
    truth: Mapping[str, np.ndarray],
    run: Callable[[], Mapping[str, np.ndarray]],
    terms: Mapping[str, int] | None = None,
) -> dict[str, float]:
    """Per tensor, the error an honest computation in ``fmt`` makes.

    ``max |run − truth|``, at least the format's unit roundoff times ``max |truth|``;
    ``run`` computes the tensors in that precision (nlref in float32, or the family's
    emulation). In float16 and bfloat16, a tensor that sums over K positions (``terms``)
    gets √K times that: PyTorch's CPU kernels keep some intermediate results of a step
    in the format (batch norm's backward does), and their rounding errors then add up over
    the K terms of a parameter gradient.
    """
    got = run()
    u = UNIT_ROUNDOFF[fmt]
    spread = terms if fmt in ("float16", "bfloat16") and terms else {}
    out = {}
    for name, want in truth.items():
        magnitude = float(np.max(np.abs(want), initial=0.0))
        err = float(np.max(np.abs(np.asarray(got[name], np.float64) - want), initial=0.0))
        err = max(err, u * magnitude, np.finfo(np.float64).tiny)
        out[name] = err * math.sqrt(spread.get(name, 1))
    return out
