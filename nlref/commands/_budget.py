"""The up-front estimate of ``nlref attention`` and ``nlref explore``, and their limits.

Before any work, both commands estimate the time and memory of the forwards they will run
(one per pairwise function) from the shapes alone, and refuse (exit 2, saying what to
change) when

- the query–key pairs, summed over the pairwise functions, exceed :data:`MAX_PAIRS`
  (about :data:`MAX_PAIRS` × :data:`SECONDS_PER_PAIR` seconds of work), unless
  ``--force`` is given;
- the memory plan of :func:`nlref.engine.plan` finds that even tiles of one query would
  not fit in the memory available (never forced: it could not run).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from . import CLIError

#: Query–key pairs (N·N′, summed over the pairwise functions) above which the commands
#: refuse to start without ``--force``: 10¹⁰, about 100 s of work at :data:`SECONDS_PER_PAIR`.
MAX_PAIRS = 10**10
#: Seconds one query–key pair of a forward takes: the softmax variants on float64, 2 CPU
#: cores (the dot product and the concatenation are 2–4 times faster).
SECONDS_PER_PAIR = 1e-8


@dataclass(frozen=True)
class Estimate:
    """What the forwards of one command will cost."""

    n: int
    n_keys: int
    variants: int
    pairs: int
    seconds: float
    peak_bytes: int
    available_bytes: int | None

    def describe(self) -> str:
        """One line: pairs, time and memory."""
        memory = _bytes(self.peak_bytes)
        if self.available_bytes is not None:
            memory += f" of {_bytes(self.available_bytes)} available"
        return (
            f"{self.variants} forward{'s' if self.variants > 1 else ''} of N x N' = "
            f"{self.n:,} x {self.n_keys:,} = {self.n * self.n_keys:.2g} query-key pairs: "
            f"about {_duration(self.seconds)} and {memory}"
        )


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "under a second"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate(
    channels: int,
    spatial: Sequence[int],
    key_spatial: Sequence[int],
    variants: Sequence[str],
    *,
    sub_sample: tuple[int, ...] | None,
) -> Estimate:
    """The cost of one hand-set forward per variant on x (1, channels, *spatial), float64.

    Raises
    ------
    CLIError
        If the memory plan finds that even tiles of one query would not fit.
    """
    from .. import engine
    from ..demo.photo import variant_config

    n, n_keys = math.prod(spatial), math.prod(key_spatial)
    x = np.broadcast_to(np.zeros((), dtype=np.float64), (1, channels, *spatial))  # no memory
    peak, available = 0, None
    for name in variants:
        cfg = variant_config(name, channels, scale=None, sub_sample=sub_sample)
        try:
            plan = engine.plan(x, cfg)
        except engine.MemoryLimitError as err:
            raise CLIError(f"{err}; use a smaller --size, or --sub-sample 2 or more") from err
        peak, available = max(peak, plan.estimated_bytes), plan.available_bytes
    pairs = len(variants) * n * n_keys
    return Estimate(
        n=n,
        n_keys=n_keys,
        variants=len(variants),
        pairs=pairs,
        seconds=pairs * SECONDS_PER_PAIR,
        peak_bytes=peak,
        available_bytes=available,
    )


def refuse_if_too_large(est: Estimate, *, force: bool, largest_size: int | None, what: str) -> None:
    """Raise CLIError when ``est`` exceeds :data:`MAX_PAIRS` and ``force`` is False.

    ``largest_size`` is the largest ``--size`` that fits (for the message), ``what`` the
    input in words.
    """
    if force or est.pairs <= MAX_PAIRS:
        return
    size_hint = f"--size {largest_size} or less, " if largest_size else ""
    raise CLIError(
        f"{what} means {est.describe()}, above the limit of {MAX_PAIRS:.0e} pairs "
        f"(about {_duration(MAX_PAIRS * SECONDS_PER_PAIR)}); use {size_hint}--sub-sample "
        "2 or more (4x fewer keys), fewer --pairwise functions, or --force to run anyway"
    )


def largest_size(fits: Callable[[int], bool], start: int, longest: int) -> int | None:
    """The largest ``--size`` below ``start`` whose grid ``fits``, or None.

    ``longest`` is the image's longer side: sizes that give the same grid (the same
    downsampling factor) are reported as the smallest of them, ceil(longest / factor).
    """
    lo, hi = 2, start - 1
    if hi < lo or not fits(lo):
        return None
    while lo < hi:  # fits is monotone in the size: bisect
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    factor = max(1, math.ceil(longest / lo))
    return max(2, math.ceil(longest / factor))
