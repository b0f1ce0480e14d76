"""``nlref attention``: where chosen pixels of any image attend, as a PNG.

The image is averaged down to a grid of at most ``--size`` cells on its longer side; each
cell gets colour + position features on a sphere (:func:`nlref.demo.photo.pixel_features`),
and :func:`nlref.forward` runs the chosen pairwise function with hand-set weights
(:func:`nlref.demo.photo.hand_set_params`). Queries are pixel coordinates of the original
image, row first::

    nlref attention photo.jpg --query 120,200
    nlref attention photo.jpg --query 120,200 --query 400,90 --out map.png
    nlref attention photo.jpg --query 120,200 --pairwise all      # the four variants
    nlref attention photo.png --query 50,60 --pairwise dot_product --sub-sample 2

PNG files are read by matplotlib; JPEG and the other formats by Pillow (both come with
``pip install 'nlref[viz]'``). Exit status 0 on success, 2 on a usage error (an unreadable
image, a query outside it, matplotlib missing).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, TextIO

from . import CLIError

__all__ = ["add_parser", "parse_query"]


def parse_query(text: str) -> tuple[int, int]:
    """Parse ``"Y,X"`` (pixel row, column) into a tuple of two ints."""
    parts = text.replace(" ", "").split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected Y,X (row,column in pixels), got {text!r}")
    try:
        y, x = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected two integers Y,X (row,column in pixels), got {text!r}"
        ) from None
    return y, x


def _cmd_attention(args: argparse.Namespace, out: TextIO) -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise CLIError(
            "nlref attention draws with matplotlib, which is not installed; "
            "pip install 'nlref[viz]'"
        ) from err
    from .. import viz
    from ..demo import photo
    from ..pairwise import names

    pairwise = names() if "all" in args.pairwise else list(dict.fromkeys(args.pairwise))
    try:
        image = photo.load_image(args.image)
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from err
    height, width = image.shape[:2]
    queries = args.query
    for y, x in queries:
        if not (0 <= y < height and 0 <= x < width):
            raise CLIError(
                f"query {y},{x} lies outside the image ({height} rows x {width} columns); "
                "give Y,X with 0 <= Y < height and 0 <= X < width"
            )
    small, factor = photo.downsample(image, args.size)
    feats = photo.pixel_features(small, position_weight=args.position_weight)
    h, w = feats.spatial
    grid = [(min(y // factor, h - 1), min(x // factor, w - 1)) for y, x in queries]
    sub_sample = None if args.sub_sample == 1 else (args.sub_sample, args.sub_sample)
    if sub_sample is not None and (h < args.sub_sample or w < args.sub_sample):
        raise CLIError(f"--sub-sample {args.sub_sample} is larger than the grid {h}x{w}")
    start = time.perf_counter()
    atts = photo.attention_by_variant(
        feats.x, variants=pairwise, scale=args.scale, sub_sample=sub_sample
    )
    seconds = time.perf_counter() - start
    n_keys = next(iter(atts.values())).shape[-1]
    print(
        f"{args.image}: {height}x{width} pixels -> grid {h}x{w} ({factor}x{factor} pixels a "
        f"cell), N={h * w}, N'={n_keys}, C={feats.x.shape[1]} features "
        f"({', '.join(feats.channels)}), scale {args.scale:g}; forward in {seconds:.2f} s",
        file=out,
    )
    for (y, x), q in zip(queries, grid, strict=True):
        for name, att in atts.items():
            row = viz.attention_row(att, q, feats.spatial)
            peak = viz.unravel(int(row.argmax()), row.shape)
            print(
                f"  query {y},{x} (cell {q[0]},{q[1]}) {name:<18} max {row.max():.2e} at key "
                f"cell {peak[0]},{peak[1]}, sum {row.sum():.3f}",
                file=out,
            )
    if len(pairwise) == 1:
        fig = viz.plot_attention_2d(
            image,
            atts[pairwise[0]],
            grid,
            spatial=feats.spatial,
            titles=[f"query {y},{x}" for y, x in queries],
            suptitle=f"{pairwise[0]}, α = {args.scale:g}",
        )
        figures = [(Path(args.out), fig)]
    else:
        base = Path(args.out)
        figures = []
        for k, q in enumerate(grid):
            path = base if len(grid) == 1 else base.with_name(f"{base.stem}_{k + 1}{base.suffix}")
            fig = viz.plot_pairwise_comparison(image, atts, q, spatial=feats.spatial)
            figures.append((path, fig))
    for path, fig in figures:
        try:
            written = viz.save_png(fig, path, dpi=args.dpi)
        except (OSError, ValueError) as err:
            raise CLIError(f"cannot write {path}: {err}") from err
        print(f"wrote {written}", file=out)
    return 0


def add_parser(sub: Any) -> None:
    from ..pairwise import names

    p = sub.add_parser(
        "attention",
        help="draw where chosen pixels of an image attend (PNG)",
        description=(
            "Run a Non-local pairwise function on colour + position features of IMAGE and "
            "draw the attention of each query pixel over the image."
        ),
    )
    p.add_argument("image", metavar="IMAGE", help="an image file (PNG, JPEG, ...)")
    p.add_argument(
        "--query",
        action="append",
        required=True,
        type=parse_query,
        metavar="Y,X",
        help="query pixel, row,column in the original image (repeatable)",
    )
    p.add_argument(
        "--pairwise",
        action="append",
        choices=[*names(), "all"],
        metavar="NAME",
        help=f"pairwise function (repeatable, or 'all'; default gaussian): {', '.join(names())}",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="PATH.png",
        help="where to write the figure (default IMAGE-STEM_attention.png here)",
    )
    p.add_argument(
        "--size", type=int, default=48, help="longer side of the feature grid (default 48)"
    )
    p.add_argument(
        "--scale", type=float, default=6.0, help="α, the logit scale (default 6; larger is sharper)"
    )
    p.add_argument(
        "--position-weight",
        type=float,
        default=0.25,
        help="weight of the position features against colour (default 0.25; 0 = colour only)",
    )
    p.add_argument(
        "--sub-sample",
        type=int,
        default=1,
        metavar="K",
        help="max-pool the keys K x K, as sub_sample=(K, K) (default 1: off)",
    )
    p.add_argument("--dpi", type=int, default=100, help="resolution of the PNG (default 100)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace, out: TextIO) -> int:
    if args.pairwise is None:
        args.pairwise = ["gaussian"]
    if args.out is None:
        args.out = f"{Path(args.image).stem}_attention.png"
    if args.size < 2:
        raise CLIError(f"--size must be >= 2, got {args.size}")
    if not args.scale > 0:
        raise CLIError(f"--scale must be > 0, got {args.scale}")
    if args.position_weight < 0:
        raise CLIError(f"--position-weight must be >= 0, got {args.position_weight}")
    if args.sub_sample < 1:
        raise CLIError(f"--sub-sample must be >= 1, got {args.sub_sample}")
    if not str(args.out).lower().endswith(".png"):
        raise CLIError(f"--out must end in .png, got {args.out}")
    return _cmd_attention(args, out)
