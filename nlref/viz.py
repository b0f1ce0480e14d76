r"""Pictures of what a Non-local block attends to, on matplotlib.

Every function takes attention arrays as :func:`nlref.forward` returns them
(``cache.attention``, shape (B, N, N′)) from any backend: CuPy and array-api-strict arrays
are copied to the host with :func:`nlref.to_numpy`. Plot functions return a
:class:`matplotlib.figure.Figure` (made without pyplot, so nothing accumulates in a global
state and nothing needs a display); :func:`save_png` writes one to disk, and a notebook shows
it as the cell's value.

- :func:`plot_attention_2d`: where chosen queries look over an image (a heatmap overlay,
  the query marked);
- :func:`plot_attention_clip`: where one query of a clip (T×H×W) looks in every frame;
- :func:`plot_pairwise_comparison`: the four pairwise variants side by side, for one query;
- :func:`plot_attention_matrix`: the full N×N′ matrix, for small inputs.

Coordinates: a query is given on the *query grid* S (the spatial shape of x), as a tuple
((y, x) for 2D, (t, y, x) for 3D) or as a flat index into N = prod(S). Keys live on the
key grid S′ (S after the max-pool of ``sub_sample``); a map over S′ is stretched over the
whole image, so pooled keys cover their pooling window.

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

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "attention_row",
    "flat_index",
    "new_figure",
    "plot_attention_2d",
    "plot_attention_clip",
    "plot_attention_matrix",
    "plot_pairwise_comparison",
    "save_png",
    "unravel",
]

VIZ_HINT = "pip install 'nlref[viz]' (matplotlib)"
QUERY_COLOUR = "#00e5ff"
MAX_MATRIX_ENTRIES = 128 * 128


def new_figure(width: float, height: float) -> Figure:
    """An empty matplotlib Figure of ``width`` × ``height`` inches, constrained layout, made
    without pyplot (for your own panels next to nlref's)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(f"nlref.viz needs matplotlib: {VIZ_HINT}") from err
    return Figure(figsize=(width, height), layout="constrained")


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


def _host_attention(attention: Array, batch: int) -> np.ndarray:
    a = to_numpy(attention)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"expected attention of shape (B, N, N′) or (N, N′), got {a.shape}")
    if not 0 <= batch < a.shape[0]:
        raise ValueError(f"batch={batch} outside [0, B={a.shape[0]})")
    return a[batch]


def _key_grid(spatial: Sequence[int], n_keys: int, key_spatial: Sequence[int] | None):
    if key_spatial is not None:
        key_spatial = tuple(int(s) for s in key_spatial)
        if math.prod(key_spatial) != n_keys:
            raise ValueError(
                f"key_spatial={key_spatial} has {math.prod(key_spatial)} positions but the "
                f"attention has N′={n_keys} keys"
            )
        return key_spatial
    spatial = tuple(spatial)
    if math.prod(spatial) == n_keys:
        return spatial
    # keys were max-pooled: find the integer kernel that gives N' keys
    for k in range(2, max(spatial) + 1):
        for kernel in _kernels(len(spatial), k):
            guess = tuple(s // kk for s, kk in zip(spatial, kernel, strict=True))
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


def attention_row(
    attention: Array,
    query: int | Sequence[int],
    spatial: Sequence[int],
    *,
    key_spatial: Sequence[int] | None = None,
    batch: int = 0,
) -> np.ndarray:
    """Where one query looks: row i of the attention, reshaped to the key grid (host array).

    Parameters
    ----------
    attention : array, shape (B, N, N′) or (N, N′)
        Any backend (moved to the host).
    query : tuple or int
        On the query grid ``spatial`` (see the module docstring).
    spatial : sequence of int
        S, the query grid (N = prod(S)).
    key_spatial : sequence of int, optional
        S′, the key grid; default S, or S pooled by the kernel that gives N′ keys.
    batch : int
        Which sample.

    Returns
    -------
    ndarray, shape S′
    """
    a = _host_attention(attention, batch)
    spatial = tuple(int(s) for s in spatial)
    if a.shape[0] != math.prod(spatial):
        raise ValueError(
            f"the attention has N={a.shape[0]} queries but S={spatial} has {math.prod(spatial)}"
        )
    keys = _key_grid(spatial, a.shape[1], key_spatial)
    return a[flat_index(query, spatial)].reshape(keys)


# --------------------------------------------------------------------------- drawing


def _overlay(
    ax: Axes,
    image: np.ndarray | None,
    amap: np.ndarray,
    extent: tuple[float, float, float, float],
    *,
    cmap: str,
    max_alpha: float,
    interpolation: str,
    vmax: float | None = None,
) -> Any:
    """The image, dimmed, then the map in colour with opacity growing with the value.

    The colour scale runs from 0 (or the map's minimum, if negative) to ``vmax`` (default
    the map's maximum). Returns a ScalarMappable for a colour bar.
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    if image is not None:
        ax.imshow(0.55 * image, extent=extent, interpolation="antialiased")
    top = float(np.max(amap)) if vmax is None else vmax
    bottom = min(0.0, float(np.min(amap)))  # signed maps (the dot product) start at their min
    norm = Normalize(vmin=bottom, vmax=top if top > bottom else bottom + 1.0)
    rgba = colormaps[cmap](norm(amap))
    rgba[..., 3] = max_alpha * np.clip(norm(amap), 0.0, 1.0) ** 0.5
    if image is None:
        rgba[..., 3] = 1.0
    ax.imshow(rgba, extent=extent, interpolation=interpolation)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_xticks([])
    ax.set_yticks([])
    return ScalarMappable(norm=norm, cmap=cmap)


def _cell_centre(coord: Sequence[int], grid: Sequence[int], size: Sequence[int]) -> tuple:
    """Pixel (row, col) of the centre of grid cell ``coord`` when the grid spans ``size``."""
    return tuple((c + 0.5) * s / g for c, g, s in zip(coord, grid, size, strict=True))


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


def plot_attention_2d(
    image: Array | None,
    attention: Array,
    queries: Sequence[int | Sequence[int]],
    *,
    spatial: Sequence[int] | None = None,
    key_spatial: Sequence[int] | None = None,
    batch: int = 0,
    titles: Sequence[str] | None = None,
    show_image: bool = True,
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
    attention : array, shape (B, N, N′)
    queries : sequence
        Query positions (y, x) on the query grid, or flat indices.
    spatial : (h, w), optional
        The query grid; default the image's (H, W).
    key_spatial : (h′, w′), optional
        The key grid; default inferred (see :func:`attention_row`).
    batch : int
    titles : sequence of str, optional
        One per query; default "query (y, x)".
    show_image : bool
        Also draw the plain image in a first panel.
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
    if image is None and spatial is None:
        raise ValueError("give the image or the query grid spatial=(h, w)")
    img = None
    if image is not None:
        img = _host_image(image)
    if spatial is None:
        spatial = img.shape[:2]
    spatial = tuple(int(s) for s in spatial)
    if len(spatial) != 2:
        raise ValueError(f"plot_attention_2d needs a 2D query grid, got spatial={spatial}")
    size = img.shape[:2] if img is not None else spatial
    maps = [
        attention_row(attention, q, spatial, key_spatial=key_spatial, batch=batch) for q in queries
    ]
    if titles is not None and len(titles) != len(queries):
        raise ValueError(f"got {len(titles)} titles for {len(queries)} queries")
    n_panels = len(queries) + (1 if show_image and img is not None else 0)
    aspect = size[0] / size[1]
    fig = new_figure(panel_size * n_panels, panel_size * aspect + 0.5)
    axes = np.atleast_1d(fig.subplots(1, n_panels))
    extent = (0.0, float(size[1]), float(size[0]), 0.0)
    k = 0
    if show_image and img is not None:
        axes[0].imshow(img, extent=extent)
        axes[0].set_title("input")
        axes[0].set_xticks([])
        axes[0].set_yticks([])
        k = 1
    for j, (q, amap) in enumerate(zip(queries, maps, strict=True)):
        ax = axes[k + j]
        _overlay(ax, img, amap, extent, cmap=cmap, max_alpha=max_alpha, interpolation=interpolation)
        coord = unravel(flat_index(q, spatial), spatial)
        _mark_query(ax, *_cell_centre(coord, spatial, size), scale=panel_size / 3.0)
        ax.set_title(titles[j] if titles is not None else f"query {coord}")
    if suptitle:
        fig.suptitle(suptitle)
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
    attention: Array,
    query: Sequence[int] | int,
    *,
    spatial: Sequence[int] | None = None,
    key_spatial: Sequence[int] | None = None,
    batch: int = 0,
    cmap: str = "inferno",
    max_alpha: float = 0.9,
    interpolation: str = "nearest",
    panel_size: float = 2.2,
    suptitle: str | None = None,
) -> Figure:
    """Where a query in frame t of a clip looks in *every* frame: a grid of frames.

    The first row shows the clip's frames, the second the attention of the query over each
    frame (all frames share one colour scale, so the panels are comparable). The query is
    marked in its own frame.

    Parameters
    ----------
    clip : array (T, H, W, 3) or None
    attention : array, shape (B, N, N′) with N = T·h·w
    query : (t, y, x) or flat index, on the query grid
    spatial : (T, h, w), optional
        Default the clip's (T, H, W).
    key_spatial : (T′, h′, w′), optional
        Default inferred ((1, k, k) pooling is recognised).
    """
    frames = None if clip is None else np.asarray(to_numpy(clip), dtype=np.float64)
    if frames is not None and (frames.ndim != 4 or frames.shape[-1] != 3):
        raise ValueError(f"expected a clip of shape (T, H, W, 3), got {frames.shape}")
    if spatial is None:
        if frames is None:
            raise ValueError("give the clip or the query grid spatial=(T, h, w)")
        spatial = frames.shape[:3]
    spatial = tuple(int(s) for s in spatial)
    if len(spatial) != 3:
        raise ValueError(f"plot_attention_clip needs a 3D query grid (T, h, w), got {spatial}")
    amap = attention_row(attention, query, spatial, key_spatial=key_spatial, batch=batch)
    t_keys = amap.shape[0]
    coord = unravel(flat_index(query, spatial), spatial)
    size = frames.shape[1:3] if frames is not None else spatial[1:]
    rows = 2 if frames is not None else 1
    fig = new_figure(panel_size * t_keys + 0.8, panel_size * rows * size[0] / size[1] + 0.6)
    axes = np.array(fig.subplots(rows, t_keys, squeeze=False))
    extent = (0.0, float(size[1]), float(size[0]), 0.0)
    vmax = float(amap.max())
    mappable = None
    for t in range(t_keys):
        # frame t of the keys covers query frames [t*kt, (t+1)*kt)
        kt = spatial[0] // t_keys
        t_img = t * kt
        base = frames[t_img] if frames is not None else None
        if frames is not None:
            axes[0, t].imshow(base, extent=extent)
            axes[0, t].set_xticks([])
            axes[0, t].set_yticks([])
            axes[0, t].set_title(f"frame {t_img}")
        ax = axes[rows - 1, t]
        mappable = _overlay(
            ax,
            base,
            amap[t],
            extent,
            cmap=cmap,
            max_alpha=max_alpha,
            interpolation=interpolation,
            vmax=vmax,
        )
        if kt and coord[0] // kt == t:
            _mark_query(ax, *_cell_centre(coord[1:], spatial[1:], size), scale=panel_size / 3.0)
            ax.set_title(f"query {coord}", color="#007a8a")
        else:
            ax.set_title(f"keys in frame {t_img}")
    fig.colorbar(mappable, ax=axes[rows - 1, :].tolist(), shrink=0.8, label="attention")
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def plot_pairwise_comparison(
    image: Array | None,
    attentions: Mapping[str, Array],
    query: Sequence[int] | int,
    *,
    spatial: Sequence[int] | None = None,
    key_spatial: Sequence[int] | None = None,
    batch: int = 0,
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
        Variant name -> attention (B, N, N′), e.g. from
        :func:`nlref.demo.photo.attention_by_variant`.
    query : (y, x) or flat index on the query grid

    Each panel has its own colour bar: the softmax variants' rows sum to 1, the others'
    are f/N′, and the dot product's can be negative (its scale then starts at its minimum).
    """
    from .pairwise import get as get_pairwise

    if not attentions:
        raise ValueError("attentions is empty: give at least one variant")
    img = None if image is None else _host_image(image)
    if spatial is None:
        if img is None:
            raise ValueError("give the image or the query grid spatial=(h, w)")
        spatial = img.shape[:2]
    spatial = tuple(int(s) for s in spatial)
    size = img.shape[:2] if img is not None else spatial
    coord = unravel(flat_index(query, spatial), spatial)
    n = len(attentions)
    fig = new_figure(panel_size * n + 0.6 * n, panel_size * size[0] / size[1] + 0.8)
    axes = np.atleast_1d(fig.subplots(1, n))
    extent = (0.0, float(size[1]), float(size[0]), 0.0)
    for ax, (name, att) in zip(axes, attentions.items(), strict=True):
        amap = attention_row(att, query, spatial, key_spatial=key_spatial, batch=batch)
        shown = _overlay(
            ax, img, amap, extent, cmap=cmap, max_alpha=0.9, interpolation=interpolation
        )
        fig.colorbar(shown, ax=ax, shrink=0.7, format="%.1e")
        _mark_query(ax, *_cell_centre(coord, spatial, size), scale=panel_size / 3.0)
        try:
            softmax = get_pairwise(name).softmax
            subtitle = "softmax over j" if softmax else "f / N′"
        except ValueError:
            subtitle = ""
        ax.set_title(f"{name}\n{subtitle}", fontsize=10)
    fig.suptitle(suptitle or f"query {coord}: one row of f / C(x) per pairwise function")
    return fig


def plot_attention_matrix(
    attention: Array,
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
    a = _host_attention(attention, batch)
    n, n_keys = a.shape
    if n * n_keys > max_entries:
        raise ValueError(
            f"the attention is {n}×{n_keys} = {n * n_keys} entries, more than "
            f"max_entries={max_entries}; plot single rows with plot_attention_2d, or raise "
            "max_entries"
        )
    fig = new_figure(max(size * min(max(n_keys / n, 0.5), 2.0) + 1.2, 5.0), size)
    ax = fig.subplots()
    shown = ax.imshow(a, cmap=cmap, interpolation="nearest", aspect="auto")
    ax.set_xlabel(f"key j (N′ = {n_keys})")
    ax.set_ylabel(f"query i (N = {n})")
    fig.colorbar(shown, ax=ax, label="A_ij = f / C(x)")
    ax.set_title(title or f"attention of sample {batch}: {n}×{n_keys}", fontsize=10)
    return fig


def save_png(fig: Figure, path: str | Path, *, dpi: int = 100, palette: bool = False) -> Path:
    """Save ``fig`` as a PNG at ``path`` (parent folders created); returns the path.

    With ``palette=True`` the picture is quantised to 256 colours (with Pillow, which
    matplotlib depends on) and saved as an indexed PNG: about three times smaller, which
    is what the README's pictures use.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_png writes PNG files: give a path ending in .png, got {path}")
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
