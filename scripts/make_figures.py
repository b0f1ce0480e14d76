"""Regenerate the pictures of the README and the docs: ``docs/images/*.png``.

    python scripts/make_figures.py              # everything, the toy task included (~1 min)
    python scripts/make_figures.py --no-toy     # only the attention maps (~10 s)

Every figure is computed by nlref itself (:mod:`nlref.demo.figures`): the attention maps of
matplotlib's sample photo and of a synthetic clip, and the long-range toy task trained in
pure nlref (both models, default seed). The explorer's screenshot (``explorer.png``) is
taken in headless Chromium (:mod:`nlref.explore.browser`: Debian's ``chromium`` and
Playwright; ``--no-explorer`` skips it) from the page that ``nlref explore --sample``
writes, with the pointer on the cap. The PNGs are saved with a 256-colour palette so that
each stays well under 300 KB; the script fails if one does not. It also prints the toy
task's numbers, for the README.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_BYTES = 300 * 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--no-toy", action="store_true", help="skip training the toy task")
    parser.add_argument(
        "--no-explorer", action="store_true", help="skip the explorer's screenshot (Chromium)"
    )
    parser.add_argument("--dpi", type=int, default=80)
    args = parser.parse_args(argv)

    from nlref.demo import figures, toy

    results = None
    if not args.no_toy:
        results = []
        for kind in toy.KINDS:
            r = toy.train_default(kind)
            results.append(r)
            print(
                f"toy {kind:>8}: test accuracy {r.test_acc:.1%}, "
                f"{len(r.losses)} steps in {r.seconds:.1f} s"
            )
        batch = toy.sample(toy.ToyTask(), 1000, 7)
        _, on_b = toy.marker_attention(results[0].params, batch, results[0].model)
        print(
            f"toy attention of A on B: {on_b[batch.labels == 1].mean():.3f} (same colour), "
            f"{on_b[batch.labels == 0].mean():.3f} (different), uniform {1 / 144:.4f}"
        )
    start = time.perf_counter()
    paths = figures.write_all(args.out, toy_results=results, palette=True, dpi=args.dpi)
    if not args.no_explorer:
        paths.append(explorer_screenshot(args.out / "explorer.png"))
    too_big = []
    for p in paths:
        size = p.stat().st_size
        print(f"wrote {p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}  {size / 1024:.0f} KB")
        if size > MAX_BYTES:
            too_big.append(p.name)
    print(f"{len(paths)} figures in {time.perf_counter() - start:.1f} s")
    if too_big:
        print(f"larger than {MAX_BYTES // 1024} KB: {too_big}; lower --dpi", file=sys.stderr)
        return 1
    return 0


def explorer_screenshot(path: Path) -> Path:
    """The explorer of the sample photo (every pairwise function), the pointer on the cap,
    as a 256-colour PNG."""
    import tempfile

    from PIL import Image

    from nlref import explore
    from nlref.demo import photo
    from nlref.explore import browser

    page = explore.from_image(photo.sample_photo_path(), pairwise="all", size=48)
    with tempfile.TemporaryDirectory() as tmp:
        html = page.save(Path(tmp) / "explorer.html")
        raw = browser.screenshot(
            html,
            Path(tmp) / "shot.png",
            script="window.nlref.select([8, 19], 'gaussian')",  # a query on the cap
            width=1100,
            height=760,
        )
        with Image.open(raw) as im:
            im.convert("RGB").quantize(colors=256, dither=Image.Dither.NONE).save(
                path, format="PNG", optimize=True
            )
    print(f"explorer page: {page.nbytes / 2**20:.1f} MiB")
    return path


if __name__ == "__main__":
    sys.exit(main())
