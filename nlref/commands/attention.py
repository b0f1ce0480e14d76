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

Any size works: only the rows of the queries asked are read from the forward's cache
(``cache.attention_rows``), so an attention that the engine evaluates in tiles is fine.
Before any work the command prints an estimate of time and memory, and refuses inputs
above 10¹⁰ query–key pairs (about 100 s of work) unless ``--force`` is given. A progress
bar on stderr follows the forwards (quiet when stderr is not a terminal, or with
``--quiet``).

PNG files are read by matplotlib; JPEG and the other formats by Pillow (both come with
``pip install 'nlref[viz]'``). Exit status 0 on success, 2 on a usage error (an unreadable
image, a query outside it, an input above the limit, matplotlib missing).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, TextIO

from . import CLIError, _budget

__all__ = ["add_parser", "parse_query"]

DEFAULT_SCALE = 6.0


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


def resolve_pairwise(chosen: list[str] | None, scale: float | None) -> tuple[list[str], float, str]:
    """The variants to run, α (``scale``, or :data:`DEFAULT_SCALE`) and a note on it;
    refuses a scale that a named variant does not take, as :class:`nlref.NonLocalConfig`
    does.

    Raises
    ------
    CLIError
    """
    from ..pairwise import get, names

    chosen = chosen or ["gaussian"]
    pairwise = names() if "all" in chosen else list(dict.fromkeys(chosen))
    if scale is not None and not scale > 0:
        raise CLIError(f"--scale must be > 0, got {scale:g}")
    without = [n for n in pairwise if not get(n).uses_scale]
    if scale is not None and without and "all" not in chosen:
        raise CLIError(
            f"--scale {scale:g}: pairwise={without[0]!r} has no θᵢᵀφⱼ term for a scale to "
            "multiply; leave --scale out for it"
        )
    alpha = DEFAULT_SCALE if scale is None else scale
    note = f"scale α = {alpha:g}" if len(without) < len(pairwise) else "no scale"
    if without and len(without) < len(pairwise):
        note += f" (not used by {', '.join(without)})"
    return pairwise, alpha, note


def check_common(args: argparse.Namespace, suffix: str) -> None:
    """The checks ``nlref attention`` and ``nlref explore`` share (before any work)."""
    if args.size < 2:
        raise CLIError(f"--size must be >= 2, got {args.size}")
    if args.position_weight < 0:
        raise CLIError(f"--position-weight must be >= 0, got {args.position_weight}")
    if args.sub_sample < 1:
        raise CLIError(f"--sub-sample must be >= 1, got {args.sub_sample}")
    if not str(args.out).lower().endswith(suffix):
        raise CLIError(f"--out must end in {suffix}, got {args.out}")


def need_matplotlib(command: str) -> None:
    """Refuse early, without importing it (slow), when matplotlib is not installed."""
    import importlib.util

    try:
        missing = importlib.util.find_spec("matplotlib") is None
    except (ImportError, ValueError):  # a None entry in sys.modules: blocked
        missing = True
    if missing:
        raise CLIError(
            f"nlref {command} needs matplotlib (images and figures), which is not installed; "
            "pip install 'nlref[viz]'"
        )


def read_size(path: str) -> tuple[int, int]:
    """(height, width) of an image file from its header, as a usage error if unreadable."""
    from ..demo import photo

    try:
        return photo.image_size(path)
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise CLIError(str(err)) from err


def _cmd_attention(args: argparse.Namespace, out: TextIO) -> int:
    need_matplotlib("attention")
    from .. import viz
    from ..demo import photo

    pairwise, alpha, scale_note = resolve_pairwise(args.pairwise, args.scale)
    height, width = read_size(args.image)
    queries = args.query
    for y, x in queries:
        if not (0 <= y < height and 0 <= x < width):
            raise CLIError(
                f"query {y},{x} lies outside the image ({height} rows x {width} columns); "
                "give Y,X with 0 <= Y < height and 0 <= X < width"
            )
    (h, w), factor = photo.grid_shape(height, width, args.size)
    k = args.sub_sample
    if h < k or w < k:
        raise CLIError(f"--sub-sample {k} is larger than the grid {h}x{w}")
    sub_sample = None if k == 1 else (k, k)
    channels = 3 + 2 + 1  # colour, position, the sphere's lift

    def cost(size: int) -> _budget.Estimate:
        (hs, ws), _ = photo.grid_shape(height, width, size)
        return _budget.estimate(
            channels, (hs, ws), (hs // k, ws // k), pairwise, sub_sample=sub_sample
        )

    est = cost(args.size)
    print(
        f"{args.image}: {height}x{width} pixels -> grid {h}x{w} ({factor}x{factor} pixels a "
        f"cell), N={h * w}, N'={(h // k) * (w // k)}"
        + (f" (keys pooled {k}x{k}: {h // k}x{w // k})" if k > 1 else "")
        + f", C={channels} features, {scale_note}",
        file=out,
    )
    print(f"estimate: {est.describe()}", file=out)
    _budget.refuse_if_too_large(
        est,
        force=args.force,
        largest_size=_budget.largest_size(
            lambda s: cost(s).pairs <= _budget.MAX_PAIRS, args.size, max(height, width)
        ),
        what=f"--size {args.size} on a {height}x{width} image ({h}x{w} grid)",
    )
    try:
        image = photo.load_image(args.image)
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from err
    if image.shape[:2] != (height, width):
        raise CLIError(
            f"{args.image}: the header says {height}x{width} pixels, the pixels "
            f"are {image.shape[0]}x{image.shape[1]}"
        )
    small, _ = photo.downsample(image, args.size)
    feats = photo.pixel_features(small, position_weight=args.position_weight)
    grid = [(min(y // factor, h - 1), min(x // factor, w - 1)) for y, x in queries]
    start = time.perf_counter()
    caches = photo.block_caches(
        feats.x,
        variants=pairwise,
        scale=alpha,
        sub_sample=sub_sample,
        progress=False if args.quiet else None,
    )
    print(f"forward in {time.perf_counter() - start:.2f} s", file=out)
    shown = image[: h * factor, : w * factor]  # the pixels the grid covers
    pooled = f" of the pooled {h // k}x{w // k} key grid" if k > 1 else ""
    for (y, x), q in zip(queries, grid, strict=True):
        for name, cache in caches.items():
            row = viz.attention_row(cache, q)
            peak = viz.unravel(int(row.argmax()), row.shape)
            centre = [int((p + 0.5) * k * factor) for p in peak]
            print(
                f"  query {y},{x} (cell {q[0]},{q[1]}) {name:<18} max {row.max():.2e} at key "
                f"cell {peak[0]},{peak[1]}{pooled} (around pixel {centre[0]},{centre[1]}), "
                f"sum {row.sum():.3f}",
                file=out,
            )
    if len(pairwise) == 1:
        cache = caches[pairwise[0]]
        fig = viz.plot_attention_2d(
            shown,
            cache,
            grid,
            query_pixels=queries,
            suptitle=f"{pairwise[0]}, {scale_note}",
        )
        figures = [(Path(args.out), fig)]
    else:
        base = Path(args.out)
        figures = []
        for j, (q, pixel) in enumerate(zip(grid, queries, strict=True)):
            path = base if len(grid) == 1 else base.with_name(f"{base.stem}_{j + 1}{base.suffix}")
            fig = viz.plot_pairwise_comparison(shown, caches, q, query_pixel=pixel)
            figures.append((path, fig))
    for path, fig in figures:
        try:
            written = viz.save_png(fig, path, dpi=args.dpi)
        except (OSError, ValueError) as err:
            raise CLIError(f"cannot write {path}: {err}") from err
        print(f"wrote {written}", file=out)
    return 0


def add_image_options(
    p: argparse.ArgumentParser, *, size: int, pairwise: str, limits: str = ""
) -> None:
    """The feature options ``nlref attention`` and ``nlref explore`` share (``limits``:
    what ``--force`` also overrides, beyond the query-key pairs)."""
    from ..pairwise import names

    p.add_argument(
        "--pairwise",
        action="append",
        choices=[*names(), "all"],
        metavar="NAME",
        help=f"pairwise function (repeatable, or 'all'; default {pairwise}): {', '.join(names())}",
    )
    p.add_argument(
        "--size",
        type=int,
        default=size,
        help=f"longer side of the feature grid (default {size})",
    )
    p.add_argument(
        "--scale",
        type=float,
        default=None,
        help=f"α, the logit scale of the variants that take one (default {DEFAULT_SCALE:g}; "
        "larger is sharper)",
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
    p.add_argument(
        "--force",
        action="store_true",
        help=f"run even above the limit of {_budget.MAX_PAIRS:.0e} query-key pairs{limits}",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")


def add_parser(sub: Any) -> None:
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
        "--out",
        default=None,
        metavar="PATH.png",
        help="where to write the figure (default IMAGE-STEM_attention.png here)",
    )
    add_image_options(p, size=48, pairwise="gaussian")
    p.add_argument("--dpi", type=int, default=100, help="resolution of the PNG (default 100)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace, out: TextIO) -> int:
    if args.out is None:
        args.out = f"{Path(args.image).stem}_attention.png"
    check_common(args, ".png")
    if args.dpi < 1:
        raise CLIError(f"--dpi must be >= 1, got {args.dpi}")
    return _cmd_attention(args, out)
