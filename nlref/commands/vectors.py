"""``nlref vectors``: write golden vectors for other frameworks, or re-verify a directory.

::

    nlref vectors --out golden/                       # every variant x preset x shape
    nlref vectors --out golden/ --preset mmcv --pairwise concatenation
    nlref vectors --out golden-onnx/ --format onnx    # ONNX backend-test folders
    nlref vectors --out golden/ --force               # replace the vectors already there
    nlref vectors --check golden/

``--format npz`` (the default) writes one ``.npz`` per case (inputs, parameters, output,
attention, upstream gradient and every gradient, float64) and a ``manifest.json`` with each
case's config and the recommended float64 and float32 tolerances; ``--format onnx`` writes
one folder per case with ``model.onnx`` and ``test_data_set_0/input_0.pb``,
``output_0.pb``; see ``docs/vectors.md``. A directory that already holds vectors is
refused unless ``--force``. A progress bar goes to stderr (``--quiet`` turns it off). The
exit status is 0 on success, 1 when ``--check`` finds a mismatch and 2 on a usage error.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, TextIO

from . import CLIError

__all__ = ["add_parser"]


def _check(args: argparse.Namespace, out: TextIO) -> int:
    from .. import __version__, vectors
    from .._table import format_table

    start = time.perf_counter()
    try:
        result = vectors.check(args.check, progress=False if args.quiet else None)
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise CLIError(str(err)) from err
    rows = [
        [preset, cases, tensors, f"{worst:.2g}", "FAIL" if _cases(result, preset) else "ok"]
        for preset, (cases, tensors, worst) in result.per_preset.items()
    ]
    header = ["preset", "cases", "tensors", "worst err / tolerance", "status"]
    print("\n".join(format_table(header, rows, align="<>>><")), file=out)
    print(file=out)
    for case, problem in result.failures:
        print(f"FAIL {case}: {problem}", file=out)
    verdict = "PASS" if result.ok else f"FAIL ({len(result.failures)} problems)"
    dtype = "float64" if result.storage == "npz" else "float64 against float32 files"
    print(
        f"nlref {__version__} vectors --check {args.check}: {result.cases} cases "
        f"({result.storage}), {result.tensors} tensors recomputed in {dtype} in "
        f"{time.perf_counter() - start:.1f} s, worst error {result.worst_rel:.2g} x the "
        f"tolerance: {verdict}",
        file=out,
    )
    return 0 if result.ok else 1


def _cases(result: Any, preset: str) -> set[str]:
    """The names of ``preset``'s cases among the failures (case names start with it)."""
    return {case for case, _ in result.failures if case.split("-", 1)[0] == preset}


def _cmd_vectors(args: argparse.Namespace, out: TextIO) -> int:
    from .. import __version__, vectors

    if args.check:
        return _check(args, out)
    start = time.perf_counter()
    try:
        manifest = vectors.write(
            args.out,
            presets=args.preset,
            pairwise=args.pairwise,
            format=args.format,
            force=args.force,
            progress=False if args.quiet else None,
        )
    except (ValueError, FileExistsError, ImportError) as err:
        raise CLIError(str(err)) from err
    except OSError as err:
        raise CLIError(f"cannot write to {args.out}: {err}") from err
    cases = manifest["cases"]
    size = sum(p.stat().st_size for p in Path(args.out).rglob("*") if p.is_file())
    by_preset: dict[str, int] = {}
    for c in cases:
        by_preset[c["preset"]] = by_preset.get(c["preset"], 0) + 1
    print(
        f"nlref {__version__} vectors: wrote {len(cases)} cases ({args.format}, "
        f"{size / 2**20:.1f} MiB) to {args.out} in {time.perf_counter() - start:.1f} s: "
        + ", ".join(f"{p} {n}" for p, n in by_preset.items()),
        file=out,
    )
    print(f"manifest: {Path(args.out) / vectors.MANIFEST} (configs and tolerances)", file=out)
    return 0


def add_parser(sub: Any) -> None:
    from ..pairwise import names
    from ..presets import names as preset_names
    from ..vectors import FORMATS

    p = sub.add_parser(
        "vectors",
        help="write golden vectors (npz or ONNX, with a JSON manifest) or re-verify a directory",
        description=(
            "Write nlref's forward and backward for every pairwise variant x preset x a few "
            "shapes (1-D to 3-D, odd sizes, pooling on and off, BN train and eval) as .npz "
            "files readable without pickle, or as ONNX backend-test folders (model.onnx with "
            "input_0.pb and output_0.pb), with a manifest of configs and float64/float32 "
            "tolerances; or re-verify such a directory against nlref."
        ),
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", metavar="DIR", help="write the vectors to DIR")
    what.add_argument("--check", metavar="DIR", help="re-verify the vectors in DIR")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="npz",
        help="npz (default: every tensor, float64) or onnx (model.onnx + input/output .pb)",
    )
    p.add_argument("--force", action="store_true", help="replace the vectors DIR already holds")
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
    p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=_cmd_vectors)
