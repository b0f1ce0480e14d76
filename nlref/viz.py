r"""Pictures of what a Non-local block attends to, on matplotlib, and the explorer.

Every function takes the attention as :func:`nlref.forward` returns it: the array
``cache.attention`` (B, N, N′) from any backend (CuPy and array-api-strict arrays are
copied to the host with :func:`nlref.to_numpy`), or the **cache itself**, whose rows are
then read with ``cache.attention_rows``, so that an attention the engine evaluated in tiles
(and never held whole) can be drawn too. Plot functions return a
:class:`matplotlib.figure.Figure` (made without pyplot, so nothing accumulates in a global
state and nothing needs a display); :func:`save_png` writes one to disk, and a notebook
shows it as the cell's value.

- :func:`plot_attention_2d`: where chosen queries look over an image (a heatmap overlay,
  the query marked);
- :func:`plot_attention_clip`: where one query of a clip (T×H×W) looks in every frame;
- :func:`plot_pairwise_comparison`: the four pairwise variants side by side, for one query;
- :func:`plot_attention_matrix`: the full N×N′ matrix, for small inputs;
- :func:`explore`: the interactive explorer (an HTML page that Jupyter shows inline; see
  :mod:`nlref.explore`).

Coordinates: a query is given on the *query grid* S (the spatial shape of x), as a tuple
((y, x) for 2D, (t, y, x) for 3D) or as a flat index into N = prod(S). Keys live on the
key grid S′ (S after the max-pool of ``sub_sample``). The grids are stretched over the
image: query cell (y, x) covers pixels [y·H/h, (y+1)·H/h) × [x·W/w, (x+1)·W/w), and a
pooled key cell covers its pooling window of query cells (max-pooling drops the cells that
do not fill a window, so the map may stop short of the bottom and right edges). Titles
give a query in image pixels (the centre of its cell, or the pixel you pass), with the
grid cell when the grid is coarser than the image.

Every attention figure has a colour bar. ``colour_scale`` chooses it: ``"panel"`` (each
map from 0 to its own maximum: spread-out maps stay visible), ``"shared"`` (one scale for
all panels, comparable), or ``"log"`` (four decades below the largest value, for maps
whose weights span orders of magnitude); the colour bar says which.

matplotlib is an optional dependency (``pip install 'nlref[viz]'``): ``import nlref`` works
without it, and only these plot functions need it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._backend import Array, to_numpy
from .analysis import attention_shape

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .explore import Explorer

__all__ = [
    "COLOUR_SCALES",
    "attention_row",
    "explore",
    "flat_index",
    "key_grid",
    "new_figure",
    "plot_attention_2d",
    "plot_attention_clip",
    "plot_attention_matrix",
    "plot_pairwise_comparison",
    "query_label",
    "save_png",
    "unravel",
]

VIZ_HINT = "pip install 'nlref[viz]' (matplotlib)"
QUERY_COLOUR = "#00e5ff"
MAX_MATRIX_ENTRIES = 128 * 128
COLOUR_SCALES = ("panel", "shared", "log")
#: Powers of ten below the maximum that the log colour scale shows.
LOG_DECADES = 4


def new_figure(width: float, height: float) -> Figure:
    """An empty matplotlib Figure of ``width`` × ``height`` inches, constrained layout, made
    without pyplot (for your own panels next to nlref's)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(f"nlref.viz needs matplotlib: {VIZ_HINT}") from err
    return Figure(figsize=(width, height), layout="constrained")


def explore(image: Array | None, attention: Any, **kwargs: Any) -> Explorer:
    """The interactive attention explorer of ``attention`` over ``image``.

    The same as :func:`nlref.explore.explore` (see there for the parameters): returns an
    :class:`nlref.explore.Explorer`, which a notebook displays inline and
    ``.save("explorer.html")`` writes as one self-contained page.
    """
    from .explore import explore as build

    return build(image, attention, **kwargs)


# --------------------------------------------------------------------------- indexing


def flat_index(query: int | Sequence[int], spatial: Sequence[int]) -> int:
    """The flat query index i in [0, N) of ``query`` on the grid ``spatial`` (C order).

    Raises
    ------
    ValueError
        If the query has the wrong number of coordinates or lies outside the grid.
    """
    spatial = tuple(int(s) for s in spatial)
    n = math.prod(spatial)
    if isinstance(query, (int, np.integer)) and not isinstance(query, bool):
        if not 0 <= int(query) < n:
            raise ValueError(f"query index {query} outside [0, N={n}) for S={spatial}")
        return int(query)
    coords = tuple(int(q) for q in query)
    if len(coords) != len(spatial):
        raise ValueError(
            f"query {coords} has {len(coords)} coordinates but S={spatial} has {len(spatial)}"
        )
    for q, s in zip(coords, spatial, strict=True):
        if not 0 <= q < s:
            raise ValueError(f"query {coords} lies outside the grid S={spatial}")
    return int(np.ravel_multi_index(coords, spatial))


def unravel(index: int, spatial: Sequence[int]) -> tuple[int, ...]:
    """Grid coordinates of the flat index ``index`` on ``spatial`` (inverse of flat_index)."""
    return tuple(int(i) for i in np.unravel_index(int(index), tuple(spatial)))


def key_grid(
    spatial: Sequence[int],
    n_keys: int,
    *,
    key_spatial: Sequence[int] | None = None,
    kernel: Sequence[int] | None = None,
) -> tuple[tuple[int, ...], tuple[int | float, ...]]:
    """The key grid S′ and the pooling kernel that made it from the query grid S.

    Parameters
    ----------
    spatial : sequence of int
        S, the query grid.
    n_keys : int
        N′, the number of keys.
    key_spatial : sequence of int, optional
        S′; default S when N′ = N, else S pooled by the smallest integer kernel (k, …, k),
        or (1, k, k) for a clip, that gives N′ keys.
    kernel : sequence of int, optional
        The pooling kernel; default the integer k per axis with S // k = S′ (1 where not
        pooled), or S / S′ where no integer fits (the keys are then stretched over S).

    Raises
    ------
    ValueError
        If no grid fits N′, or the given one does not.
    """
    spatial = tuple(int(s) for s in spatial)
    if key_spatial is not None:
        keys = tuple(int(s) for s in key_spatial)
        if math.prod(keys) != n_keys:
            raise ValueError(
                f"key_spatial={keys} has {math.prod(keys)} positions but the attention has "
                f"N′={n_keys} keys"
            )
    elif math.prod(spatial) == n_keys:
        keys = spatial
    else:
        keys = _infer_pooled(spatial, n_keys, kernel)
    if len(keys) != len(spatial):
        raise ValueError(f"the key grid {keys} and the query grid {spatial} differ in rank")
    if kernel is None:
        return keys, tuple(_kernel_of(s, k) for s, k in zip(spatial, keys, strict=True))
    kernel = tuple(int(k) for k in kernel)
    if len(kernel) != len(spatial) or any(
        k < 1 or s // k != kk for k, s, kk in zip(kernel, spatial, keys, strict=True)
    ):
        raise ValueError(
            f"pooling S={spatial} by kernel={kernel} does not give the key grid {keys}"
        )
    return keys, kernel


def _kernel_of(size: int, keys: int) -> int | float:
    """The integer kernel k with size // k == keys, or size / keys when there is none (a
    key grid that is not a pooling of the query grid is stretched over it)."""
    k = max(1, size // max(keys, 1))
    return k if size // k == keys else size / keys


def _infer_pooled(
    spatial: tuple[int, ...], n_keys: int, kernel: Sequence[int] | None
) -> tuple[int, ...]:
    if kernel is not None:
        keys = tuple(s // int(k) for s, k in zip(spatial, kernel, strict=True))
        if math.prod(keys) == n_keys:
            return keys
    for k in range(2, max(spatial) + 1):
        for kern in _kernels(len(spatial), k):
            guess = tuple(s // kk for s, kk in zip(spatial, kern, strict=True))
            if math.prod(guess) == n_keys:
                return guess
    raise ValueError(
        f"cannot tell the key grid: N′={n_keys} keys for S={spatial}; pass key_spatial"
    )


def _kernels(dims: int, k: int) -> list[tuple[int, ...]]:
    kernels = [(k,) * dims]
    if dims == 3:
        kernels.append((1, k, k))  # the video convention: pool space, not time
    return kernels


def _is_cache(attention: Any) -> bool:
    return hasattr(attention, "attention_rows") and hasattr(attention, "input_shape")


def _host_attention(attention: Array, batch: int) -> np.ndarray:
    if _is_cache(attention):
        n = math.prod(attention.input_shape[2:])
        attention = attention.attention_rows(0, n)
    a = to_numpy(attention)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"expected attention of shape (B, N, N′) or (N, N′), got {a.shape}")
    if not 0 <= batch < a.shape[0]:
        raise ValueError(f"batch={batch} outside [0, B={a.shape[0]})")
    return a[batch]


def _grids(
    attention: Any,
    spatial: Sequence[int] | None,
    key_spatial: Sequence[int] | None,
    kernel: Sequence[int] | None = None,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(S, S′, kernel) of an attention or a cache (a cache knows its grids)."""
    if _is_cache(attention):
        spatial = tuple(attention.input_shape[2:]) if spatial is None else spatial
        key_spatial = tuple(attention.key_shape) if key_spatial is None else key_spatial
        sub = getattr(getattr(attention, "cfg", None), "sub_sample", None)
        if kernel is None and sub is not None:
            kernel = tuple(sub)
    if spatial is None:
        raise ValueError("give the query grid spatial=(h, w)")
    spatial = tuple(int(s) for s in spatial)
    _, n, n_keys = attention_shape(attention)
    if n != math.prod(spatial):
        raise ValueError(
            f"the attention has N={n} queries but the query grid {spatial} has "
            f"{math.prod(spatial)}; pass spatial="
        )
    keys, kernel = key_grid(spatial, n_keys, key_spatial=key_spatial, kernel=kernel)
    return spatial, keys, kernel


def attention_row(
    attention: Any,
    query: int | Sequence[int],
    spatial: Sequence[int] | None = None,
    *,
    key_spatial: Sequence[int] | None = None,
    batch: int = 0,
) -> np.ndarray:
    """Where one query looks: row i of the attention, reshaped to the key grid (host array).

    Parameters
    ----------
    attention : array (B, N, N′) or (N, N′), or a forward cache
        Any backend (moved to the host). From a cache only row i is read
        (``cache.attention_rows(i, i + 1)``), so a tiled attention works.
    query : tuple or int
        On the query grid ``spatial`` (see the module docstring).
    spatial : sequence of int, optional
        S, the query grid (N = prod(S)); a cache knows it.
    key_spatial : sequence of int, optional
        S′, the key grid; default the cache's, else S, or S pooled by the kernel that gives
        N′ keys (:func:`key_grid`).
    batch : int
        Which sample.

    Returns
    -------
    ndarray, shape S′
    """
    spatial, keys, _ = _grids(attention, spatial, key_spatial)
    i = flat_index(query, spatial)
    b = attention_shape(attention)[0]
    if not 0 <= batch < b:
        raise ValueError(f"batch={batch} outside [0, B={b})")
    if _is_cache(attention):
        row = to_numpy(attention.attention_rows(i, i + 1))[batch, 0]
    else:
        a = attention if len(attention.shape) == 3 else attention[None]
        row = to_numpy(a[batch, i, :])
    return np.asarray(row).reshape(keys)


def query_label(
    query: int | Sequence[int],
    spatial: Sequence[int],
    size: Sequence[int] | None = None,
    *,
    pixel: Sequence[int] | None = None,
) -> str:
    """A query's title: in image pixels, with its grid cell when the grid is coarser.

    Parameters
    ----------
    query : tuple or int
        On the query grid ``spatial``.
    spatial : sequence of int
        The query grid (h, w) or (T, h, w).
    size : (H, W), optional
        The image's size in pixels; default the grid's (then pixels are cells).
    pixel : (y, x), optional
        The pixel the query was chosen at; default the centre of its cell.

    >>> query_label((2, 3), (10, 20), (100, 200))
    'query pixel (25, 35), cell (2, 3)'
    >>> query_label((2, 3), (10, 20))
    'query (2, 3)'
    >>> query_label((1, 2, 3), (4, 10, 20))
    'query in frame 1 at (2, 3)'
    """
    spatial = tuple(int(s) for s in spatial)
    cell = unravel(flat_index(query, spatial), spatial)
    plane, frame = (spatial[1:], cell[:1]) if len(spatial) == 3 else (spatial, ())
    size = tuple(plane) if size is None else tuple(int(s) for s in size)
    frame_txt = f"in frame {frame[0]} at " if frame else ""
    if size == tuple(plane) and pixel is None:
        return f"query {frame_txt}({', '.join(str(c) for c in cell[len(frame) :])})"
    if pixel is None:
        pixel = tuple(
            int((c + 0.5) * s / g) for c, g, s in zip(cell[len(frame) :], plane, size, strict=True)
        )
    pixel_txt = f"pixel ({', '.join(str(int(p)) for p in pixel)})"
    if size == tuple(plane):
        return f"query {frame_txt}{pixel_txt}"
    return f"query {frame_txt}{pixel_txt}, cell {tuple(int(c) for c in cell)}"


def _keys_note(keys: Sequence[int], kernel: Sequence[int]) -> str:
    """'keys pooled 2×2: 23×19' when pooled, else ''."""
    if all(k == 1 for k in kernel):
        return ""
    return f"keys pooled {'×'.join(map(str, kernel))}: {'×'.join(map(str, keys))} key grid"


# --------------------------------------------------------------------------- drawing


def _norm(amap: np.ndarray, colour_scale: str, vmax: float | None = None) -> Any:
    """The matplotlib Normalize of a map (see the module docstring)."""
    from matplotlib.colors import LogNorm, Normalize

    if colour_scale not in COLOUR_SCALES:
        raise ValueError(f"colour_scale must be one of {COLOUR_SCALES}, got {colour_scale!r}")
    top = float(np.max(amap)) if vmax is None else float(vmax)
    if colour_scale == "log":
        top = top if top > 0 else 1.0
        return LogNorm(vmin=top * 10.0**-LOG_DECADES, vmax=top, clip=True)
    bottom = min(0.0, float(np.min(amap)))  # signed maps (the dot product) start at their min
    return Normalize(vmin=bottom, vmax=top if top > bottom else bottom + 1.0)


def _scale_label(colour_scale: str) -> str:
    return {
        "panel": "attention (each panel: 0 to its max)",
        "shared": "attention (one scale for all panels)",
        "log": f"attention (log scale, {LOG_DECADES} decades)",
    }[colour_scale]


def _overlay(
    ax: Axes,
    image: np.ndarray | None,
    amap: np.ndarray,
    extent: tuple[float, float, float, float],
    *,
    key_extent: tuple[float, float, float, float] | None = None,
    cmap: str,
    max_alpha: float,
    interpolation: str,
    norm: Any,
) -> Any:
    """The image, dimmed, then the map in colour with opacity growing with the value.

    The map covers ``key_extent`` (default the whole image). Returns a ScalarMappable for
    a colour bar.
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable

    if image is not None:
        ax.imshow(0.55 * image, extent=extent, interpolation="antialiased")
    level = np.clip(np.ma.filled(norm(np.maximum(amap, norm.vmin)), 0.0), 0.0, 1.0)
    rgba = colormaps[cmap](level)
    rgba[..., 3] = max_alpha * level**0.5 if image is not None else 1.0
    ax.imshow(rgba, extent=key_extent or extent, interpolation=interpolation)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_xticks([])
    ax.set_yticks([])
    return ScalarMappable(norm=norm, cmap=cmap)


def _key_extent(
    spatial: Sequence[int], keys: Sequence[int], kernel: Sequence[int], size: Sequence[int]
) -> tuple[float, float, float, float]:
    """Pixels covered by the (pooled) key grid of the last two axes: (0, right, bottom, 0)."""
    (h, w), (kh, kw), (ph, pw) = spatial[-2:], keys[-2:], kernel[-2:]
    return (0.0, float(size[1]) * kw * pw / w, float(size[0]) * kh * ph / h, 0.0)


def _cell_centre(coord: Sequence[int], grid: Sequence[int], size: Sequence[int]) -> tuple:
    """Pixel (row, col) of the centre of grid cell ``coord`` when the grid spans ``size``."""
    return tuple((c + 0.5) * s / g for c, g, s in zip(coord, grid, size, strict=True))


def _query_centre(
    coord: Sequence[int], grid: Sequence[int], size: Sequence[int], pixel: Sequence[int] | None
) -> tuple:
    """Where a query is marked: the centre of the pixel it was chosen at, else of its cell."""
    if pixel is None:
        return _cell_centre(coord, grid, size)
    return (pixel[0] + 0.5, pixel[1] + 0.5)


def _mark_query(ax: Axes, row: float, col: float, scale: float) -> None:
    ax.plot(
        [col],
        [row],
        marker="o",
        markersize=9 * scale,
        markerfacecolor="none",
        markeredgecolor=QUERY_COLOUR,
        markeredgewidth=2.0,
    )
    ax.plot([col], [row], marker="+", markersize=14 * scale, color=QUERY_COLOUR, mew=1.5)


def _host_image(image: Array) -> np.ndarray:
    """An (H, W, 3) float image in [0, 1] on the host, from (H, W), (H, W, 3) or (H, W, 4).

    Integer images (uint8, uint16) are divided by their type's maximum."""
    img = np.asarray(to_numpy(image))
    if np.issubdtype(img.dtype, np.integer):
        img = img / float(np.iinfo(img.dtype).max)
    img = img.astype(np.float64)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(
            f"expected an image of shape (H, W), (H, W, 3) or (H, W, 4), got {img.shape}"
        )
    return np.clip(img[:, :, :3], 0.0, 1.0)


def _colourbar(fig: Figure, mappable: Any, ax: Any, label: str, colour_scale: str) -> None:
    bar = fig.colorbar(mappable, ax=ax, shrink=0.8, label=label)
    if colour_scale != "log":
        bar.formatter.set_powerlimits((-2, 3))
        bar.update_ticks()


def plot_attention_2d(
    image: Array | None,
    attention: Any,
    queries: Sequence[int | Sequence[int]],
    *,
    spatial: Sequence[int] | None = None,
    key_spatial: Sequence[int] | None = None,
    batch: int = 0,
    titles: Sequence[str] | None = None,
    query_pixels: Sequence[Sequence[int]] | None = None,
    show_image: bool = True,
    colour_scale: str = "panel",
    cmap: str = "inferno",
    max_alpha: float = 0.9,
    interpolation: str = "bilinear",
    panel_size: float = 3.0,
    suptitle: str | None = None,
) -> Figure:
    """Where each query looks over a 2D image: one panel per query, the query marked.

    Parameters
    ----------
    image : array (H, W, 3), (H, W) or None
        Drawn dimmed under the maps (any resolution: the grids are stretched over it). With
        None, the maps are drawn alone.
    attention : array (B, N, N′), or a forward cache
    queries : sequence
        Query positions (y, x) on the query grid, or flat indices.
    spatial : (h, w), optional
        The query grid; default the cache's, else the image's (H, W).
    key_spatial : (h′, w′), optional
        The key grid; default inferred (see :func:`key_grid`).
    batch : int
    titles : sequence of str, optional
        One per query; default :func:`query_label` (pixels, and the cell).
    query_pixels : sequence of (y, x), optional
        The pixels the queries were chosen at, for the default titles and the markers.
    show_image : bool
        Also draw the plain image in a first panel.
    colour_scale : {"panel", "shared", "log"}
        See the module docstring; each panel gets a colour bar ("shared": one for all).
    cmap, max_alpha, interpolation
        Colour map, largest opacity of the overlay, and matplotlib interpolation.
    panel_size : float
        Width of one panel in inches.
    suptitle : str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    queries = _as_query_list(queries)
    img = None
    if image is not None:
        img = _host_image(image)
    if spatial is None and not _is_cache(attention):
        if img is None:
            raise ValueError("give the image or the query grid spatial=(h, w)")
        spatial = img.shape[:2]
    spatial, keys, kernel = _grids(attention, spatial, key_spatial)
    if len(spatial) != 2:
        raise ValueError(f"plot_attention_2d needs a 2D query grid, got spatial={spatial}")
    size = img.shape[:2] if img is not None else spatial
    maps = [attention_row(attention, q, spatial, key_spatial=keys, batch=batch) for q in queries]
    if titles is not None and len(titles) != len(queries):
        raise ValueError(f"got {len(titles)} titles for {len(queries)} queries")
    if query_pixels is not None and len(query_pixels) != len(queries):
        raise ValueError(f"got {len(query_pixels)} query_pixels for {len(queries)} queries")
    n_panels = len(queries) + (1 if show_image and img is not None else 0)
    aspect = size[0] / size[1]
    fig = new_figure((panel_size + 0.7) * n_panels, panel_size * aspect + 0.8)
    axes = np.atleast_1d(fig.subplots(1, n_panels))
    extent = (0.0, float(size[1]), float(size[0]), 0.0)
    key_extent = _key_extent(spatial, keys, kernel, size)
    k = 0
    if show_image and img is not None:
        axes[0].imshow(img, extent=extent)
        axes[0].set_title("input", fontsize=10)
        axes[0].set_xticks([])
        axes[0].set_yticks([])
        k = 1
    shared = max(float(np.max(m)) for m in maps) if colour_scale != "panel" else None
    mappable = None
    for j, (q, amap) in enumerate(zip(queries, maps, strict=True)):
        ax = axes[k + j]
        norm = _norm(amap, colour_scale, vmax=shared)
        mappable = _overlay(
            ax, img, amap, extent, key_extent=key_extent, cmap=cmap, max_alpha=max_alpha,
            interpolation=interpolation, norm=norm,
        )  # fmt: skip
        coord = unravel(flat_index(q, spatial), spatial)
        pixel = None if query_pixels is None else tuple(query_pixels[j])
        _mark_query(ax, *_query_centre(coord, spatial, size, pixel), scale=panel_size / 3.0)
        label = titles[j] if titles is not None else query_label(q, spatial, size, pixel=pixel)
        ax.set_title(label, fontsize=9)
        if colour_scale != "shared":
            last = j == len(queries) - 1  # the label by the rightmost bar, clear of panels
            _colourbar(fig, mappable, ax, _scale_label(colour_scale) if last else "", colour_scale)
    if colour_scale == "shared":
        _colourbar(fig, mappable, axes[k:].tolist(), _scale_label(colour_scale), colour_scale)
    note = _keys_note(keys, kernel)
    if suptitle or note:
        fig.suptitle("\n".join(t for t in (suptitle, note) if t), fontsize=10)
    return fig


def _as_query_list(queries: Any) -> list:
    if isinstance(queries, (int, np.integer)):
        return [int(queries)]
    if isinstance(queries, tuple) and all(isinstance(q, (int, np.integer)) for q in queries):
        # a bare (y, x) could mean one query or two flat indices: ask for a list
        raise ValueError(
            f"queries={queries!r} is ambiguous: pass a list of coordinate tuples, e.g. "
            f"[{queries!r}], or a list of flat indices, e.g. {list(queries)!r}"
        )
    queries = list(queries)
    if not queries:
        raise ValueError("give at least one query")
    return queries


def plot_attention_clip(
    clip: Array | None,
    attention: Any,
    query: Sequence[int] | int,
    *,
    spatial: Sequence[int] | None = None,
    key_spatial: Sequence[int] | None = None,
    batch: int = 0,
    colour_scale: str = "shared",
    cmap: str = "inferno",
    max_alpha: float = 0.9,
    interpolation: str = "nearest",
    panel_size: float = 2.2,
    suptitle: str | None = None,
) -> Figure:
    """Where a query in frame t of a clip looks in *every* frame: a grid of frames.

    The first row shows the clip's frames, the second the attention of the query over each
    frame (with ``colour_scale="shared"``, the default, all frames share one colour scale,
    so the panels are comparable; ``"log"`` shows weak attention in far frames). The query
    is marked in its own frame.

    Parameters
    ----------
    clip : array (T, H, W, 3) or None
    attention : array (B, N, N′) with N = T·h·w, or a forward cache
    query : (t, y, x) or flat index, on the query grid
    spatial : (T, h, w), optional
        Default the cache's, else the clip's (T, H, W).
    key_spatial : (T′, h′, w′), optional
        Default inferred ((1, k, k) pooling is recognised).
    colour_scale : {"shared", "log"}
    """
    frames = None if clip is None else np.asarray(to_numpy(clip), dtype=np.float64)
    if frames is not None and (frames.ndim != 4 or frames.shape[-1] != 3):
        raise ValueError(f"expected a clip of shape (T, H, W, 3), got {frames.shape}")
    if colour_scale == "panel":
        raise ValueError('plot_attention_clip draws one map: use colour_scale="shared" or "log"')
    if spatial is None and not _is_cache(attention):
        if frames is None:
            raise ValueError("give the clip or the query grid spatial=(T, h, w)")
        spatial = frames.shape[:3]
    spatial, keys, kernel = _grids(attention, spatial, key_spatial)
    if len(spatial) != 3:
        raise ValueError(f"plot_attention_clip needs a 3D query grid (T, h, w), got {spatial}")
    amap = attention_row(attention, query, spatial, key_spatial=keys, batch=batch)
    t_keys = amap.shape[0]
    coord = unravel(flat_index(query, spatial), spatial)
    size = frames.shape[1:3] if frames is not None else spatial[1:]
    rows = 2 if frames is not None else 1
    fig = new_figure(panel_size * t_keys + 1.0, panel_size * rows * size[0] / size[1] + 0.8)
    axes = np.array(fig.subplots(rows, t_keys, squeeze=False))
    extent = (0.0, float(size[1]), float(size[0]), 0.0)
    key_extent = _key_extent(spatial, keys, kernel, size)
    norm = _norm(amap, colour_scale)
    mappable = None
    kt = kernel[0]  # frame t of the keys covers query frames [t*kt, (t+1)*kt)
    for t in range(t_keys):
        t_img = t * kt
        base = frames[t_img] if frames is not None else None
        if frames is not None:
            axes[0, t].imshow(base, extent=extent)
            axes[0, t].set_xticks([])
            axes[0, t].set_yticks([])
            axes[0, t].set_title(f"frame {t_img}", fontsize=9)
        ax = axes[rows - 1, t]
        mappable = _overlay(
            ax, base, amap[t], extent, key_extent=key_extent, cmap=cmap, max_alpha=max_alpha,
            interpolation=interpolation, norm=norm,
        )  # fmt: skip
        if coord[0] // kt == t:
            _mark_query(ax, *_cell_centre(coord[1:], spatial[1:], size), scale=panel_size / 3.0)
            ax.set_title(query_label(coord, spatial, size), color="#007a8a", fontsize=9)
        else:
            ax.set_title(f"keys in frame {t_img}", fontsize=9)
    _colourbar(fig, mappable, axes[rows - 1, :].tolist(), "attention", colour_scale)
    lines = (suptitle, _scale_label(colour_scale), _keys_note(keys, kernel))
    fig.suptitle("\n".join(t for t in lines if t), fontsize=10)
    return fig


def plot_pairwise_comparison(
    image: Array | None,
    attentions: Mapping[str, Any],
    query: Sequence[int] | int,
    *,
    spatial: Sequence[int] | None = None,
    key_spatial: Sequence[int] | None = None,
    batch: int = 0,
    query_pixel: Sequence[int] | None = None,
    colour_scale: str = "panel",
    cmap: str = "inferno",
    interpolation: str = "bilinear",
    panel_size: float = 3.0,
    suptitle: str | None = None,
) -> Figure:
    """The same query under several pairwise functions, side by side.

    Parameters
    ----------
    image : array (H, W, 3) or None
    attentions : mapping
        Variant name -> attention (B, N, N′) or forward cache, e.g. from
        :func:`nlref.demo.photo.block_caches`.
    query : (y, x) or flat index on the query grid
    query_pixel : (y, x), optional
        The pixel the query was chosen at (for the title and the marker).
    colour_scale : {"panel", "log"}
        Each panel has its own colour bar: the softmax variants' rows sum to 1, the
        others' are f/N′, and the dot product's can be negative (its scale then starts at
        its minimum).
    """
    from .pairwise import get as get_pairwise

    if not attentions:
        raise ValueError("attentions is empty: give at least one variant")
    if colour_scale == "shared":
        raise ValueError('the variants have different units: use colour_scale="panel" or "log"')
    img = None if image is None else _host_image(image)
    first = next(iter(attentions.values()))
    if spatial is None and not _is_cache(first):
        if img is None:
            raise ValueError("give the image or the query grid spatial=(h, w)")
        spatial = img.shape[:2]
    spatial, keys, kernel = _grids(first, spatial, key_spatial)
    size = img.shape[:2] if img is not None else spatial
    coord = unravel(flat_index(query, spatial), spatial)
    n = len(attentions)
    fig = new_figure((panel_size + 0.8) * n, panel_size * size[0] / size[1] + 1.0)
    axes = np.atleast_1d(fig.subplots(1, n))
    extent = (0.0, float(size[1]), float(size[0]), 0.0)
    key_extent = _key_extent(spatial, keys, kernel, size)
    pixel = None if query_pixel is None else tuple(query_pixel)
    centre = _query_centre(coord, spatial, size, pixel)
    for ax, (name, att) in zip(axes, attentions.items(), strict=True):
        amap = attention_row(att, query, spatial, key_spatial=keys, batch=batch)
        shown = _overlay(
            ax, img, amap, extent, key_extent=key_extent, cmap=cmap, max_alpha=0.9,
            interpolation=interpolation, norm=_norm(amap, colour_scale),
        )  # fmt: skip
        _colourbar(fig, shown, ax, "", colour_scale)
        _mark_query(ax, *centre, scale=panel_size / 3.0)
        try:
            softmax = get_pairwise(name).softmax
            subtitle = "softmax over j" if softmax else "f / N′"
        except ValueError:
            subtitle = ""
        ax.set_title(f"{name}\n{subtitle}", fontsize=10)
    lines = [
        suptitle
        or f"{query_label(query, spatial, size, pixel=pixel)}: one row of f / C(x) per "
        "pairwise function",
        _scale_label(colour_scale),
        _keys_note(keys, kernel),
    ]
    fig.suptitle("\n".join(t for t in lines if t), fontsize=10)
    return fig


def plot_attention_matrix(
    attention: Any,
    *,
    batch: int = 0,
    max_entries: int = MAX_MATRIX_ENTRIES,
    cmap: str = "viridis",
    title: str | None = None,
    size: float = 5.0,
) -> Figure:
    """The full N×N′ attention matrix of one sample: row i is where query i looks.

    Raises
    ------
    ValueError
        If N·N′ exceeds ``max_entries`` (a matrix that large is unreadable: plot rows with
        :func:`plot_attention_2d` instead).
    """
    _, n, n_keys = attention_shape(attention)
    if n * n_keys > max_entries:
        raise ValueError(
            f"the attention is {n}×{n_keys} = {n * n_keys} entries, more than "
            f"max_entries={max_entries}; plot single rows with plot_attention_2d, or raise "
            "max_entries"
        )
    a = _host_attention(attention, batch)
    fig = new_figure(max(size * min(max(n_keys / n, 0.5), 2.0) + 1.2, 5.0), size)
    from matplotlib.ticker import MaxNLocator  # (after new_figure: it says what to install)

    ax = fig.subplots()
    shown = ax.imshow(a, cmap=cmap, interpolation="nearest", aspect="auto")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"key j (N′ = {n_keys}, row-major on the key grid)")
    ax.set_ylabel(f"query i (N = {n}, row-major)")
    fig.colorbar(shown, ax=ax, label="A_ij = f / C(x)")
    ax.set_title(title or f"attention of sample {batch}: {n}×{n_keys}", fontsize=10)
    return fig


def save_png(fig: Figure, path: str | Path, *, dpi: int = 100, palette: bool = False) -> Path:
    """Save ``fig`` as a PNG at ``path`` (parent folders created); returns the path.

    With ``palette=True`` the picture is quantised to 256 colours (with Pillow, which
    matplotlib depends on) and saved as an indexed PNG: about three times smaller, which
    is what the README's pictures use.

    Raises
    ------
    ValueError
        If ``path`` does not end in .png, or ``dpi`` is not a positive number.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_png writes PNG files: give a path ending in .png, got {path}")
    if isinstance(dpi, bool) or not isinstance(dpi, (int, float)) or not dpi > 0:
        raise ValueError(f"dpi must be a positive number, got {dpi!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not palette:
        fig.savefig(path, dpi=dpi, format="png")
        return path
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    buffer.seek(0)
    with Image.open(buffer) as im:
        im.convert("RGB").quantize(colors=256, dither=Image.Dither.NONE).save(
            path, format="PNG", optimize=True
        )
    return path
