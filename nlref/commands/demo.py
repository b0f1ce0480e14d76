"""``nlref demo``: the whole tour in one command, with no arguments and no network.

1. The gradient checks of ``nlref gradcheck`` (every pairwise variant × 1D/2D/3D ×
   pooling), which prove each hand-derived backward against finite differences, as one
   line per case: its worst relative error and the tensor that has it.
2. Attention maps on the photo that ships with matplotlib (Grace Hopper): the Gaussian
   for four query pixels, the four pairwise variants for one query, a synthetic clip, and
   a full N×N′ matrix.
3. With ``--toy``: the long-range toy task trained in pure nlref (about a minute), with the
   accuracy of the Non-local model against a local baseline, and its learned attention.

It prints the path of every PNG it writes (under ``--out``, default ``./nlref-demo``).
Progress bars on stderr follow the figures and the training (quiet when stderr is not a
terminal, or with ``--quiet``). The exit status is 1 when a gradient check fails, 2 on a
usage error (a bad ``--dpi``, matplotlib missing), found before any work.
"""

from __future__ import annotations

import argparse
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from . import CLIError

__all__ = ["add_parser", "format_compact_table"]

DEFAULT_OUT = "nlref-demo"
MAX_DPI = 1000


def format_compact_table(rows: Sequence[Any]) -> str:
    """The gradient checks, one line per case: configuration, worst relative error over
    its tensors, the tensor that has it, and the status (fits 100 columns)."""
    from .. import _table
    from . import gradcheck as gc

    def worst(r: Any) -> tuple[str, str]:
        if not r.rel_err:
            return "n/a", "-"
        name = max(r.rel_err, key=r.rel_err.__getitem__)
        return f"{r.rel_err[name]:.1e}", gc.label(name)

    body = []
    for r in rows:
        cfg = r.case.cfg
        pooled = cfg.sub_sample is not None
        err, tensor = worst(r)
        body.append(
            [
                cfg.pairwise,
                "x".join(map(str, r.case.spatial)),
                "x".join(map(str, cfg.sub_sample)) if pooled else "-",
                cfg.pool_order.split("_")[0] if pooled else "-",
                str(len(r.tensors)),
                err,
                tensor,
                r.status,
            ]
        )
    header = ["pairwise", "S", "pool", "order", "tensors", "worst rel err", "in", "status"]
    return "\n".join(_table.format_table(header, body, align="<<<<>><<"))


def _explain() -> str:
    """What the compact table's cells mean (as ``nlref gradcheck`` explains its own)."""
    text = (
        "Each line checks one block (B=2, C=4, C'=3, batch norm in training mode, every "
        "bias): the hand-derived gradients of x and of every parameter ('tensors') against "
        "central differences in float64 along random directions. 'worst rel err' is the "
        "largest relative error |numerical - analytical| / max(|numerical|, |analytical|, "
        "atol / rtol) over those tensors, and 'in' the tensor that has it; a case is ok when "
        "every tensor is within rtol 1e-5 (atol 1e-7). 'nlref gradcheck' shows one column "
        "per tensor."
    )
    return textwrap.fill(text, 100, break_on_hyphens=False)


def _cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    from .. import __version__
    from ..pairwise import names
    from . import gradcheck as gc
    from .attention import need_matplotlib

    if not 1 <= args.dpi <= MAX_DPI:
        raise CLIError(f"--dpi must be between 1 and {MAX_DPI}, got {args.dpi}")
    need_matplotlib("demo")
    out_dir = Path(args.out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CLIError(f"cannot create --out {out_dir}: {err}") from err
    show = False if args.quiet else None

    print(f"nlref {__version__} demo: writing to {out_dir}/", file=out)
    print(
        "\n== 1. gradient checks: hand-derived backward vs central differences (float64)\n",
        file=out,
    )
    xp = gc.load_backend("numpy")
    start = time.perf_counter()
    rtol, atol = 1e-5, 1e-7
    rows = [
        gc.run_case(case, xp, mode="directions", seed=0, rtol=rtol, atol=atol)
        for case in gc.iter_cases(names(), sorted(gc.SHAPES))
    ]
    print(format_compact_table(rows), file=out)
    print("\n" + _explain(), file=out)
    failures = gc.format_failures(rows)
    if failures:
        print("\n" + failures, file=out)
    closing = gc.summary(rows, time.perf_counter() - start)
    print("\n" + textwrap.fill(closing, 100, break_on_hyphens=False), file=out)
    passed = all(r.passed for r in rows)

    from .. import viz
    from ..demo import figures, toy

    print("\n== 2. attention maps on matplotlib's sample photo and a synthetic clip\n", file=out)
    start = time.perf_counter()
    paths = figures.write_all(
        out_dir, dpi=args.dpi, log=lambda p: print(f"wrote {p}", file=out), progress=show
    )
    print(f"({len(paths)} figures in {time.perf_counter() - start:.1f} s)", file=out)

    if args.toy:
        print("\n== 3. the long-range toy task, trained in pure nlref\n", file=out)
        results = []
        for kind in toy.KINDS:
            r = toy.train_default(kind, show_progress=show)
            results.append(r)
            print(
                f"{kind:>8}: test accuracy {r.test_acc:.1%} "
                f"({len(r.losses)} Adam steps in {r.seconds:.1f} s)",
                file=out,
            )
        for fig_name, fig in (
            ("toy_training.png", figures.toy_curves_figure(results)),
            ("toy_attention.png", figures.toy_attention_figure(results[0])),
        ):
            print(f"wrote {viz.save_png(fig, out_dir / fig_name, dpi=args.dpi)}", file=out)
    else:
        print("\n(add --toy to also train the long-range toy task, about a minute)", file=out)
    print(f"\n{'PASS' if passed else 'FAIL'}: gradient checks; figures in {out_dir}/", file=out)
    return 0 if passed else 1


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="gradient-check table + attention maps of a real photo (the tour)",
        description=(
            "Run the gradient checks, then draw attention maps of the sample photo "
            "that ships with matplotlib, and print the paths of the PNGs. No arguments "
            "and no network needed."
        ),
    )
    p.add_argument(
        "--out",
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"folder for the PNGs (default ./{DEFAULT_OUT})",
    )
    p.add_argument(
        "--toy",
        action="store_true",
        help="also train the long-range toy task (Non-local vs local, about a minute)",
    )
    p.add_argument(
        "--dpi", type=int, default=90, help=f"resolution of the PNGs, 1 to {MAX_DPI} (default 90)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars on stderr")
    p.set_defaults(func=_cmd_demo)
