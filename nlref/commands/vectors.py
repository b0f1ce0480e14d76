"""``nlref vectors``: write golden vectors for other frameworks, or re-verify a directory.

::

    nlref vectors --out golden/                       # every variant x preset x shape
    nlref vectors --out golden/ --preset mmcv --pairwise concatenation
    nlref vectors --check golden/

One ``.npz`` per case (inputs, parameters, output, attention, upstream gradient and every
gradient, float64) and a ``manifest.json`` with each case's config and the recommended
float64 and float32 tolerances; see ``docs/vectors.md``. The exit status is 0 on success,
1 when ``--check`` finds a mismatch and 2 on a usage error.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, TextIO

from . import CLIError

__all__ = ["add_parser"]


def _cmd_vectors(args: argparse.Namespace, out: TextIO) -> int:
    from .. import __version__, vectors

    start = time.perf_counter()
    if args.check:
        try:
            result = vectors.check(args.check)
        except (FileNotFoundError, ValueError) as err:
            raise CLIError(str(err)) from err
        for case, problem in result.failures:
            print(f"FAIL {case}: {problem}", file=out)
        verdict = "PASS" if result.ok else f"FAIL ({len(result.failures)} problems)"
        print(
            f"nlref {__version__} vectors --check {args.check}: {result.cases} cases, "
            f"{result.tensors} tensors recomputed in float64 in "
            f"{time.perf_counter() - start:.1f} s, worst error {result.worst_rel:.2g} x the "
            f"tolerance: {verdict}",
            file=out,
        )
        return 0 if result.ok else 1
    try:
        manifest = vectors.write(args.out, presets=args.preset, pairwise=args.pairwise)
    except ValueError as err:
        raise CLIError(str(err)) from err
    except OSError as err:
        raise CLIError(f"cannot write to {args.out}: {err}") from err
    cases = manifest["cases"]
    size = sum((Path(args.out) / c["file"]).stat().st_size for c in cases)
    by_preset: dict[str, int] = {}
    for c in cases:
        by_preset[c["preset"]] = by_preset.get(c["preset"], 0) + 1
    print(
        f"nlref {__version__} vectors: wrote {len(cases)} cases ({size / 2**20:.1f} MiB) to "
        f"{args.out} in {time.perf_counter() - start:.1f} s: "
        + ", ".join(f"{p} {n}" for p, n in by_preset.items()),
        file=out,
    )
    print(f"manifest: {Path(args.out) / vectors.MANIFEST} (configs and tolerances)", file=out)
    return 0


def add_parser(sub: Any) -> None:
    from ..pairwise import names
    from ..presets import names as preset_names

    p = sub.add_parser(
        "vectors",
        help="write golden vectors (npz + JSON manifest) or re-verify a directory",
        description=(
            "Write nlref's forward and backward for every pairwise variant x preset x a few "
            "shapes (1-D to 3-D, odd sizes, pooling on and off, BN train and eval) as .npz "
            "files readable without pickle, with a manifest of configs and float64/float32 "
            "tolerances; or re-verify such a directory against nlref."
        ),
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", metavar="DIR", help="write the vectors to DIR")
    what.add_argument("--check", metavar="DIR", help="re-verify the vectors in DIR")
    p.add_argument(
        "--preset",
        action="append",
        choices=preset_names(),
        metavar="NAME",
        help=f"only this preset (repeatable): {', '.join(preset_names())}",
    )
    p.add_argument(
        "--pairwise",
        action="append",
        choices=names(),
        metavar="NAME",
        help=f"only this variant (repeatable): {', '.join(names())}",
    )
    p.set_defaults(func=_cmd_vectors)
