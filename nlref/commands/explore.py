"""``nlref explore``: an interactive attention explorer, as one self-contained HTML page.

Move the pointer over the image to choose a query and see where it attends, under each
pairwise function, with the row's entropy, its top keys and how far its map is from the
average map (:mod:`nlref.explore`). The page needs no network: open it from disk in any
browser::

    nlref explore photo.jpg --out explorer.html
    nlref explore --sample --size 64 --sub-sample 2          # matplotlib's sample photo
    nlref explore --clip                                     # the demo's synthetic clip
    nlref explore frames.npy --pairwise gaussian             # a clip (T, H, W, 3) of your own
    nlref explore --sample --family gcnet                    # GCNet's one map, beside the EG
    nlref explore --sample --family dnl                      # DNL's two terms, beside the EG

As ``nlref attention``, the image is averaged down to a grid of at most ``--size`` cells a
side and described by colour + position features, with hand-set weights. ``--family gcnet``
or ``dnl`` shows the Non-local block's successors side by side with the plain embedded
Gaussian (:func:`nlref.explore.from_family`): GCNet's single map, DNL's whitened pairwise
rows and its unary map. Before any work
the command estimates time, memory and the page's size, and refuses (exit 2, saying what to
change) above 10¹⁰ query–key pairs or a page of more than 64 MiB, unless ``--force``.
A progress bar on stderr follows the work (quiet when stderr is not a terminal, or with
``--quiet``).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from . import CLIError, _budget
from .attention import (
    add_image_options,
    check_common,
    need_matplotlib,
    read_size,
    resolve_pairwise,
)

__all__ = ["FAMILY_ATTENTION_BYTES", "MAX_PAGE_BYTES", "add_parser"]

#: The largest page ``nlref explore`` writes without ``--force`` (an upper bound of its
#: size, before compression): browsers slow down on larger ones.
MAX_PAGE_BYTES = 64 * 2**20
#: The largest pairwise attention ``--family dnl`` holds without ``--force``: the
#: disentangled block materialises it (the engine tiles only the Non-local block).
FAMILY_ATTENTION_BYTES = 512 * 2**20


def _source(args: argparse.Namespace) -> tuple[str, tuple[int, ...]]:
    """("image" | "clip" | "npy-image" | "npy-clip", the pixel shape (T?, H, W))."""
    chosen = [s for s in (args.image is not None, args.sample, args.clip) if s]
    if len(chosen) != 1:
        raise CLIError("give one of: an IMAGE file (or a .npy of frames), --sample or --clip")
    if args.clip:
        return "clip", (6, 24, 24)
    if args.sample:
        from ..demo import photo

        try:
            args.image = str(photo.sample_photo_path())
        except ImportError as err:
            raise CLIError(str(err)) from err
    if str(args.image).lower().endswith(".npy"):
        try:
            shape = np.load(args.image, mmap_mode="r", allow_pickle=False).shape
        except (OSError, ValueError) as err:
            raise CLIError(f"cannot read {args.image} as a .npy array: {err}") from err
        if len(shape) in (2, 3) and (len(shape) == 2 or shape[-1] in (1, 3, 4)):
            return "npy-image", tuple(shape[:2])
        if len(shape) == 4 and shape[-1] in (1, 3, 4):
            return "npy-clip", tuple(shape[:3])
        raise CLIError(
            f"{args.image} holds an array of shape {shape}: expected an image (H, W, 3) or "
            "a clip of frames (T, H, W, 3)"
        )
    return "image", read_size(args.image)


def _cmd_explore(args: argparse.Namespace, out: TextIO) -> int:
    need_matplotlib("explore")
    from .. import explore
    from ..demo import photo

    if args.family and args.pairwise:
        raise CLIError("--family shows its own blocks beside the embedded Gaussian: leave out "
                       "--pairwise")  # fmt: skip
    pairwise, alpha, scale_note = resolve_pairwise(args.pairwise or ["all"], args.scale)
    if args.family:  # the embedded Gaussian, and DNL's pairwise term: two N x N' attentions
        pairwise = ["embedded_gaussian"] * (2 if args.family == "dnl" else 1)
        scale_note = f"scale α = {alpha:g}"
    kind, pixels = _source(args)
    if args.family and kind.endswith("clip"):
        raise CLIError("--family shows an image, not a clip")
    clip = kind.endswith("clip")
    k = args.sub_sample
    height, width = pixels[-2:]

    def grids(size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        (h, w), _ = photo.grid_shape(height, width, size)
        frames = pixels[:1] if clip else ()
        return (*frames, h, w), (*frames, h // k, w // k)

    q_grid, k_grid = grids(args.size)
    if min(q_grid[-2:]) < k:
        raise CLIError(f"--sub-sample {k} is larger than the grid {q_grid[-2]}x{q_grid[-1]}")
    channels = 3 + len(q_grid) + 1  # colour, position, the sphere's lift
    kernel = None if k == 1 else ((1, k, k) if clip else (k, k))

    def cost(size: int) -> tuple[_budget.Estimate, int]:
        q, kk = grids(size)
        est = _budget.estimate(channels, q, kk, pairwise, sub_sample=kernel)
        return est, explore.estimate_bytes(math.prod(q), math.prod(kk), len(pairwise))

    est, page = cost(args.size)
    if args.family == "dnl" and est.n * est.n_keys * 8 > FAMILY_ATTENTION_BYTES:
        if not args.force:
            raise CLIError(
                f"--family dnl holds its whole pairwise attention ({est.n}x{est.n_keys}, "
                f"{est.n * est.n_keys * 8 / 2**20:.0f} MiB), above "
                f"{FAMILY_ATTENTION_BYTES // 2**20} MiB; use a smaller --size, "
                "--sub-sample 2 or more, or --force"
            )
    name = "the synthetic clip" if kind == "clip" else args.image
    print(
        f"{name}: {'x'.join(map(str, pixels))} pixels -> query grid "
        f"{'x'.join(map(str, q_grid))}, key grid {'x'.join(map(str, k_grid))}"
        + (f" (pooled {'x'.join(map(str, kernel))})" if kernel else "")
        + f", {scale_note}",
        file=out,
    )
    print(f"estimate: {est.describe()}; a page of at most {page / 2**20:.1f} MiB", file=out)

    def fits(size: int) -> bool:
        size_est, size_page = cost(size)
        return size_est.pairs <= _budget.MAX_PAIRS and size_page <= MAX_PAGE_BYTES

    largest = _budget.largest_size(fits, args.size, max(height, width))
    what = f"--size {args.size} ({'x'.join(map(str, q_grid))} queries)"
    _budget.refuse_if_too_large(est, force=args.force, largest_size=largest, what=what)
    if page > MAX_PAGE_BYTES and not args.force:
        size_hint = f"--size {largest} or less, " if largest else ""
        raise CLIError(
            f"{what} with {len(pairwise)} pairwise function(s) makes a page of up to "
            f"{page / 2**20:.0f} MiB, above the limit of {MAX_PAGE_BYTES // 2**20} MiB; use "
            f"{size_hint}--sub-sample 2 or more, fewer --pairwise functions, or --force"
        )
    options = dict(
        pairwise=pairwise,
        size=args.size,
        sub_sample=k,
        scale=alpha,
        position_weight=args.position_weight,
        progress=False if args.quiet else None,
    )
    start = time.perf_counter()
    try:
        if args.family:
            family_options = {k: v for k, v in options.items() if k != "pairwise"}
            page_obj = explore.from_family(args.image, args.family, **family_options)
        elif kind == "clip":
            page_obj = explore.from_clip(None, **options)
        elif kind == "npy-clip":
            page_obj = explore.from_clip(np.load(args.image, allow_pickle=False), **options)
        elif kind == "npy-image":
            page_obj = explore.from_image(np.load(args.image, allow_pickle=False), **options)
        else:
            page_obj = explore.from_image(args.image, **options)
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from err
    try:
        written = page_obj.save(args.out)
    except OSError as err:
        raise CLIError(f"cannot write {args.out}: {err}") from err
    dependence = ", ".join(
        f"{n} {v:.3f}" if math.isfinite(v) else f"{n} 0 (one map for every query)"
        for n, v in page_obj.query_dependence.items()
    )
    print(
        f"built in {time.perf_counter() - start:.1f} s; query dependence (mean Jensen-Shannon "
        f"distance of the rows to the mean row, 0 = query-independent): {dependence}",
        file=out,
    )
    print(f"wrote {written}", file=out)
    print(f"({page_obj.nbytes / 2**20:.1f} MiB, one file: open it in any browser)", file=out)
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "explore",
        help="write an interactive attention explorer (one HTML file, no network)",
        description=(
            "Run the Non-local pairwise functions on colour + position features of IMAGE "
            "(a file, a .npy of frames, --sample or --clip) and write one self-contained "
            "HTML page: point at a query to see where it attends."
        ),
    )
    p.add_argument(
        "image",
        metavar="IMAGE",
        nargs="?",
        help="an image file (PNG, JPEG, ...) or a .npy image (H, W, 3) or clip (T, H, W, 3)",
    )
    p.add_argument("--sample", action="store_true", help="use matplotlib's sample photo")
    p.add_argument("--clip", action="store_true", help="use the demo's synthetic clip")
    p.add_argument(
        "--family",
        choices=("gcnet", "dnl"),
        help="show GCNet's single map, or DNL's pairwise and unary terms, side by side with "
        "the embedded Gaussian (instead of --pairwise)",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="PATH.html",
        help="where to write the page (default IMAGE-STEM_explorer.html here)",
    )
    add_image_options(
        p, size=48, pairwise="all", limits=f" or a page of {MAX_PAGE_BYTES // 2**20} MiB"
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace, out: TextIO) -> int:
    if args.out is None:
        stem = "clip" if args.clip else "sample" if args.sample else Path(args.image or "x").stem
        args.out = f"{stem}_{args.family + '_' if args.family else ''}explorer.html"
    check_common(args, ".html")
    return _cmd_explore(args, out)
