"""``nlref demo``: the whole tour in one command, with no arguments and no network.

1. The gradient-check table of ``nlref gradcheck`` (every pairwise variant × 1D/2D/3D ×
   pooling), which proves each hand-derived backward against finite differences.
2. Attention maps on the photo that ships with matplotlib (Grace Hopper): the Gaussian
   for four query pixels, the four pairwise variants for one query, a synthetic clip, and
   a full N×N′ matrix.
3. With ``--toy``: the long-range toy task trained in pure nlref (about a minute), with the
   accuracy of the Non-local model against a local baseline, and its learned attention.

It prints the path of every PNG it writes (under ``--out``, default ``./nlref-demo``). The
exit status is 1 when a gradient check fails, 2 on a usage error (matplotlib missing).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, TextIO

from . import CLIError

__all__ = ["add_parser"]

DEFAULT_OUT = "nlref-demo"


def _cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    from .. import __version__
    from ..pairwise import names
    from . import gradcheck as gc

    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise CLIError(
            "nlref demo draws with matplotlib, which is not installed; "
            "pip install 'nlref[viz]' (or pip install -e '.[viz]' from a checkout)"
        ) from err
    out_dir = Path(args.out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CLIError(f"cannot create --out {out_dir}: {err}") from err

    print(f"nlref {__version__} demo: writing to {out_dir}/", file=out)
    print(
        "\n== 1. gradient checks: hand-derived backward vs central differences (float64)\n",
        file=out,
    )
    xp = gc.load_backend("numpy")
    start = time.perf_counter()
    rows = [
        gc.run_case(case, xp, mode="directions", seed=0, rtol=1e-5, atol=1e-7)
        for case in gc.iter_cases(names(), sorted(gc.SHAPES))
    ]
    print(gc.format_table(rows), file=out)
    failures = gc.format_failures(rows)
    if failures:
        print("\n" + failures, file=out)
    print("\n" + gc.summary(rows, time.perf_counter() - start), file=out)
    passed = all(r.passed for r in rows)

    from ..demo import figures, toy

    print("\n== 2. attention maps on matplotlib's sample photo and a synthetic clip\n", file=out)
    start = time.perf_counter()
    paths = figures.write_all(out_dir, dpi=args.dpi, log=lambda p: print(f"wrote {p}", file=out))
    print(f"({len(paths)} figures in {time.perf_counter() - start:.1f} s)", file=out)

    if args.toy:
        print("\n== 3. the long-range toy task, trained in pure nlref\n", file=out)
        results = []
        for kind in toy.KINDS:
            r = toy.train_default(kind)
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
            from .. import viz

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
            "Run the gradient-check table, then draw attention maps of the sample photo "
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
    p.add_argument("--dpi", type=int, default=90, help="resolution of the PNGs (default 90)")
    p.set_defaults(func=_cmd_demo)
