"""The demo's figures, shared by ``nlref demo``, ``scripts/make_figures.py`` and the notebooks.

Each ``*_figure`` function computes its attention with :func:`nlref.forward` and returns a
matplotlib Figure (see :mod:`nlref.viz`); :func:`write_all` saves them as PNGs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import viz
from .._backend import to_numpy as nlref_to_numpy
from . import photo, toy

__all__ = [
    "PHOTO_QUERIES",
    "PhotoSetup",
    "clip_figure",
    "comparison_figure",
    "matrix_figure",
    "photo_figure",
    "photo_setup",
    "toy_attention_figure",
    "toy_curves_figure",
    "write_all",
]

#: Queries on the sample photo, as fractions (row, col) of its height and width:
#: the cap, the face, the uniform, a star of the flag.
PHOTO_QUERIES: tuple[tuple[float, float], ...] = (
    (0.17, 0.5),
    (0.45, 0.52),
    (0.9, 0.2),
    (0.37, 0.07),
)
PHOTO_SIDE = 48  # the longer side of the feature grid: N = 46 x 39 = 1794 queries and keys
PHOTO_SCALE = 6.0  # alpha of the Gaussian on the sphere features (a sharper or broader map)


@dataclass(frozen=True)
class PhotoSetup:
    """An image, its feature grid and queries on that grid."""

    image: np.ndarray  # (H, W, 3), full resolution
    features: photo.PixelFeatures  # on the downsampled grid
    factor: int  # grid cell = factor x factor pixels
    queries: tuple[tuple[int, int], ...]  # on the grid
    pixels: tuple[tuple[int, int], ...] = ()  # the same queries in image pixels

    @property
    def shown(self) -> np.ndarray:
        """The pixels the grid covers (downsampling drops the rows and columns that do not
        fill a cell); coordinates are those of :attr:`image`."""
        h, w = self.features.spatial
        return self.image[: h * self.factor, : w * self.factor]


def photo_setup(
    image: np.ndarray | None = None,
    *,
    side: int = PHOTO_SIDE,
    queries: Sequence[tuple[float, float]] = PHOTO_QUERIES,
    position_weight: float = 0.25,
) -> PhotoSetup:
    """Features of ``image`` (default: the sample photo), and queries given as fractions
    (row, col) of the image, in pixels and on the grid."""
    if image is None:
        image = photo.load_image(photo.sample_photo_path())
    small, factor = photo.downsample(image, side)
    feats = photo.pixel_features(small, position_weight=position_weight)
    h, w = feats.spatial
    pixels = tuple((int(fy * h) * factor + factor // 2, int(fx * w) * factor + factor // 2)
                   for fy, fx in queries)  # fmt: skip
    grid = tuple((min(py // factor, h - 1), min(px // factor, w - 1)) for py, px in pixels)
    return PhotoSetup(image=image, features=feats, factor=factor, queries=grid, pixels=pixels)


def photo_figure(setup: PhotoSetup | None = None, *, scale: float = PHOTO_SCALE) -> Any:
    """The Gaussian's attention for the queries of ``setup`` over the photo."""
    setup = setup or photo_setup()
    att = photo.attention_by_variant(setup.features.x, variants=["gaussian"], scale=scale)
    return viz.plot_attention_2d(
        setup.shown,
        att["gaussian"],
        list(setup.queries),
        spatial=setup.features.spatial,
        query_pixels=list(setup.pixels),
        suptitle=(
            f"Gaussian f = exp(α xᵢᵀxⱼ), α = {scale:g}, on colour + position features: "
            "each query attends to similar pixels, near or far"
        ),
    )


def comparison_figure(
    setup: PhotoSetup | None = None, *, query: int = 0, scale: float = PHOTO_SCALE
) -> Any:
    """The four pairwise functions for one query of the photo (hand-set weights)."""
    setup = setup or photo_setup()
    atts = photo.attention_by_variant(setup.features.x, scale=scale)
    return viz.plot_pairwise_comparison(
        setup.shown,
        atts,
        setup.queries[query],
        spatial=setup.features.spatial,
        query_pixel=setup.pixels[query],
    )


def clip_figure(*, frames: int = 6, size: int = 24, scale: float = PHOTO_SCALE) -> Any:
    """A query on the moving ball of a synthetic clip attends to the ball in every frame."""
    clip, centres = photo.synthetic_clip(frames=frames, size=size)
    feats = photo.pixel_features(clip, position_weight=0.25)
    att = photo.attention_by_variant(feats.x, variants=["gaussian"], scale=scale)["gaussian"]
    t = frames // 2 - 1
    return viz.plot_attention_clip(
        clip,
        att,
        (t, *(int(c) for c in centres[t])),
        suptitle=f"space-time attention (T×H×W = {frames}×{size}×{size}): a query on the ball",
    )


def matrix_figure(*, side: int = 10) -> Any:
    """The whole N×N′ matrix for a tiny version of the photo, keys max-pooled 2×2."""
    image = photo.load_image(photo.sample_photo_path())
    small, _ = photo.downsample(image, side)
    feats = photo.pixel_features(small)
    att = photo.attention_by_variant(
        feats.x, variants=["embedded_gaussian"], scale=2.0, sub_sample=(2, 2)
    )["embedded_gaussian"]
    h, w = feats.spatial
    return viz.plot_attention_matrix(
        att,
        title=f"embedded Gaussian, {h}×{w} photo, keys pooled 2×2\n"
        f"N × N′ = {h * w} × {(h // 2) * (w // 2)}",
    )


# --------------------------------------------------------------------------- toy task


def toy_curves_figure(results: Sequence[toy.TrainResult], *, window: int = 25) -> Any:
    """Training loss and accuracy (moving averages) of trained toy models, test accuracy in
    the legend."""
    fig = viz.new_figure(9.0, 3.2)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for r in results:
        steps = np.arange(1, len(r.losses) + 1)
        kernel = np.ones(window) / window
        label = f"{r.model.kind} (test acc {r.test_acc:.1%})"
        ax_loss.plot(steps[window - 1 :], np.convolve(r.losses, kernel, "valid"), label=label)
        ax_acc.plot(steps[window - 1 :], np.convolve(r.train_acc, kernel, "valid"), label=label)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("training accuracy")
    ax_acc.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax_acc.set_ylim(0.3, 1.02)
    ax_acc.legend(loc="lower right")
    ax_loss.set_title("cross-entropy")
    ax_acc.set_title(f"moving average over {window} steps")
    return fig


TOY_COLOURS = np.array([[0.95, 0.25, 0.2], [0.25, 0.8, 0.3], [0.3, 0.5, 1.0], [0.95, 0.85, 0.2]])


def toy_image(batch: toy.ToyBatch, index: int) -> np.ndarray:
    """An RGB picture of image ``index`` of a toy batch: markers and distractors in colour."""
    x = batch.x[index]
    k = x.shape[0] - 2
    palette = TOY_COLOURS[:k] if k <= len(TOY_COLOURS) else _hsv_palette(k)
    strength = np.clip(x[2:], 0.0, 1.0)  # (K, S, S)
    rgb = 0.12 + np.einsum("khw,kc->hwc", strength, palette - 0.12)
    return np.clip(rgb, 0.0, 1.0)


def _hsv_palette(k: int) -> np.ndarray:
    from matplotlib.colors import hsv_to_rgb

    return hsv_to_rgb(np.stack([np.arange(k) / k, np.full(k, 0.8), np.full(k, 0.95)], 1))


def toy_attention_figure(
    result: toy.TrainResult,
    batch: toy.ToyBatch | None = None,
    *,
    different: int = 2,
) -> Any:
    """Inputs and the learned attention rows of both markers, one column per example.

    Columns: the first same-colour image of each colour, then ``different`` images whose
    markers differ. Rows: the input (A circled, B squared), the attention row of marker A,
    and that of marker B, with the weight each gives to the other marker in the title.
    """
    if batch is None:
        batch = toy.sample(result.task, 256, 7)
    same = batch.labels == 1
    picks = []
    for c in range(result.task.colours):
        found = np.flatnonzero(same & (batch.colours[:, 0] == c))
        picks += [int(found[0])] if found.size else []
    picks += [int(i) for i in np.flatnonzero(~same)[:different]]
    from matplotlib.colors import LogNorm

    _, cache = toy.forward(result.params, batch.x[picks], result.model, training=False)
    att = nlref_to_numpy(cache.attention)  # (P, N, N)
    s = batch.x.shape[-1]
    n = len(picks)
    fig = viz.new_figure(1.9 * n + 1.0, 6.4)
    axes = np.array(fig.subplots(3, n, squeeze=False))
    extent = (-0.5, s - 0.5, s - 0.5, -0.5)
    # a log scale: spread-out rows (weights near 1/N) stay visible next to sharp ones (~1)
    norm = LogNorm(vmin=10.0**-viz.LOG_DECADES, vmax=1.0, clip=True)
    shown = None
    for col, i in enumerate(picks):
        (ra, ca), (rb, cb) = batch.markers[i]
        a_flat, b_flat = ra * s + ca, rb * s + cb
        axes[0, col].imshow(toy_image(batch, i), extent=extent, interpolation="nearest")
        label = "same colour" if batch.labels[i] == 1 else "different"
        axes[0, col].set_title(label, fontsize=9)
        for row, (q, k, name) in enumerate(((a_flat, b_flat, "A → B"), (b_flat, a_flat, "B → A"))):
            ax = axes[row + 1, col]
            shown = ax.imshow(att[col, q].reshape(s, s), cmap="inferno", norm=norm, extent=extent)
            ax.set_title(f"{name}: {att[col, q, k]:.2f}", fontsize=9)
        for ax in axes[:, col]:
            ax.plot(ca, ra, "o", ms=11, mfc="none", mec="white", mew=1.6)
            ax.plot(cb, rb, "s", ms=11, mfc="none", mec="#00e5ff", mew=1.6)
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("input: A ○, B □")
    axes[1, 0].set_ylabel("attention of A")
    axes[2, 0].set_ylabel("attention of B")
    bar = fig.colorbar(
        shown, ax=axes[1:, :].ravel().tolist(), shrink=0.8, label="attention (log scale)"
    )
    bar.ax.axhline(1 / (s * s), color=viz.QUERY_COLOUR, lw=1.5)
    at_left = bar.ax.get_yaxis_transform()  # x in the bar's axes, y in attention
    bar.ax.text(
        -0.3, 1 / (s * s), "uniform", va="center", ha="right", fontsize=8, transform=at_left
    )
    fig.suptitle(
        f"learned attention over the N = {s * s} pixels (log colour scale; uniform: "
        f"1/{s * s} = {1 / (s * s):.4f})",
        fontsize=11,
    )
    return fig


# --------------------------------------------------------------------------- all


def write_all(
    out_dir: str | Path,
    *,
    toy_results: Sequence[toy.TrainResult] | None = None,
    palette: bool = False,
    dpi: int = 90,
    log: Callable[[str], None] | None = None,
    progress: bool | None = False,
) -> list[Path]:
    """Write every figure as a PNG under ``out_dir``; returns the paths, in order.

    ``toy_results`` (from :func:`nlref.demo.toy.train`, the non-local model first) adds the
    toy task's figures. ``palette`` saves 256-colour PNGs (smaller, for the docs);
    ``progress`` shows a bar on stderr (None: when stderr is a terminal).
    """
    out = Path(out_dir)
    setup = photo_setup()
    jobs: list[tuple[str, Callable[[], Any]]] = [
        ("photo_attention.png", lambda: photo_figure(setup)),
        ("pairwise_comparison.png", lambda: comparison_figure(setup)),
        ("clip_attention.png", clip_figure),
        ("attention_matrix.png", matrix_figure),
    ]
    if toy_results:
        nonlocal_result = next(r for r in toy_results if r.model.kind == "nonlocal")
        jobs += [
            ("toy_training.png", lambda: toy_curves_figure(toy_results)),
            ("toy_attention.png", lambda: toy_attention_figure(nonlocal_result)),
        ]
    from ..progress import progress as progress_bar

    paths = []
    for name, make in progress_bar(jobs, desc="figures", unit="figure", enabled=progress):
        fig = make()
        paths.append(viz.save_png(fig, out / name, dpi=dpi, palette=palette))
        if log is not None:
            log(str(paths[-1]))
    return paths
