r"""An attention explorer: one self-contained HTML page, for the browser and for Jupyter.

Point at a query and see its map. The page shows an image (or every frame of a clip) and,
for the query under the pointer, its attention over the keys drawn on the image in place,
with a colour bar, the query's pixel and grid coordinates, and a side panel: the row's
entropy, its top keys, how far its map is from the average map, and the same for the
whole image (:mod:`nlref.analysis`). A switcher shows the same query under each pairwise
function.

The page is one file: no network, no CDN; it opens from disk in any current browser
(Chrome/Edge 80+, Firefox 113+, Safari 16.4+). In Jupyter, an :class:`Explorer` displays
inline.

Build one from

- any attention and image: :func:`explore` (``nlref.viz.explore``), from arrays (B, N, N′)
  or from the caches of :func:`nlref.forward`, tiled ones included;
- an image file or array with the demo's colour + position features: :func:`from_image`
  (``nlref explore IMAGE``), or a clip: :func:`from_clip`;
- a PyTorch Non-local module inside a real model: :func:`capture` its input during the
  model's forward, then :func:`from_torch`;
- the Non-local block's successors on an image, side by side with the embedded Gaussian:
  :func:`from_family` (``nlref explore --family gcnet|dnl``): GCNet's single map, DNL's
  whitened pairwise rows and its unary map.

What the page holds
-------------------
A set of named **layers** (one per pairwise function, or per term of a family block), each
with one attention row per query and, optionally, query-independent maps over the keys (by
default the mean row and the attention each key receives); a layer may also hold maps
only (GCNet's one map, DNL's unary term). Rows are stored in 8 bits a key: row i is kept as
its minimum lo, its maximum hi and :math:`q_{ij} = \operatorname{round}(255 \sqrt{t_{ij}})`
with :math:`t_{ij} = (A_{ij} - lo)/(hi - lo)`, read back as
:math:`lo + (q_{ij}/255)^2 (hi - lo)`: the error is at most :math:`(hi - lo)/255`, and
much smaller for the small weights (so the log colour scale has about four decades), then
deflate-compressed; what several layers share (identical rows) is stored once. The
numbers in the side panel (entropy, distances, top keys) are computed by nlref at full
precision.

The page exposes its data to scripts as ``window.nlref``: ``grid`` (the query and key grid
shapes), ``variants`` (the layer names), ``row(variant, y, x)`` (``row(variant, t, y, x)``
for a clip: the row the page draws, N′ numbers, key grid row-major), ``map(variant,
name)`` (a query-independent map, N′ numbers), ``maps(variant)`` (its names),
``panels`` (the layers drawn side by side, or null), ``select(coords, variant)``,
``selected``, and ``ready``, a promise that resolves once the data are decoded and
drawn.
"""

from __future__ import annotations

import base64
import html
import json
import math
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .. import analysis
from .._backend import Array, to_numpy

__all__ = [
    "MAX_IMAGE_SIDE",
    "Explorer",
    "Layer",
    "capture",
    "estimate_bytes",
    "explore",
    "from_clip",
    "from_family",
    "from_image",
    "from_torch",
    "image_features",
]

#: The longer side, in pixels, of the picture stored in the page (larger images are
#: shown downscaled; coordinates stay those of the original pixels).
MAX_IMAGE_SIDE = 768
#: The longer side of each stored frame of a clip.
MAX_FRAME_SIDE = 256
QUANTISATION = "sqrt-uint8: lo + (q/255)² (hi − lo) per row"
#: Images smaller than this (on their longer side) are drawn with crisp pixels.
PIXELATED_BELOW = 160
VIZ_HINT = "pip install 'nlref[viz]' (matplotlib, which brings Pillow)"


@dataclass(frozen=True)
class Layer:
    """One named set of maps of the explorer.

    Attributes
    ----------
    rows : array (B, N, N′), forward cache, or None
        The per-query attention; None for a layer that has only query-independent maps.
    label : str
        A line under the name in the side panel (e.g. the pairwise formula).
    maps : mapping
        Name -> (B, N′) or (N′,) array, or (array, description): extra query-independent
        maps over the keys. The mean row and the attention each key receives are added
        for layers with rows.
    """

    rows: Any = None
    label: str = ""
    maps: Mapping[str, Any] = field(default_factory=dict)


class Explorer:
    """An attention explorer page: save it, or let Jupyter display it inline.

    Attributes
    ----------
    html : str
        The whole page.
    query_dependence : dict
        Layer name -> the whole image's query dependence (:func:`nlref.analysis.
        query_dependence`; NaN for layers without rows).
    """

    def __init__(self, page: str, query_dependence: Mapping[str, float], height: int) -> None:
        self.html = page
        self.query_dependence = dict(query_dependence)
        self._height = height

    @property
    def nbytes(self) -> int:
        """Size of the page in bytes (UTF-8)."""
        return len(self.html.encode("utf-8"))

    def save(self, path: str | Path) -> Path:
        """Write the page to ``path`` (parent folders created); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.html, encoding="utf-8")
        return path

    def _repr_html_(self) -> str:
        """Jupyter's inline display: the page in a sandboxed iframe (scripts only)."""
        return (
            f'<iframe title="nlref attention explorer" sandbox="allow-scripts" '
            f'style="width: 100%; height: {self._height}px; border: 0" '
            f'srcdoc="{html.escape(self.html, quote=True)}"></iframe>'
        )

    def __repr__(self) -> str:
        dependence = ", ".join(f"{k} {v:.3f}" for k, v in self.query_dependence.items())
        return f"<nlref Explorer: {self.nbytes / 2**20:.1f} MiB; query dependence {dependence}>"


# --------------------------------------------------------------------------- grids


def _grids(
    source: Any,
    image_spatial: tuple[int, ...] | None,
    spatial: Sequence[int] | None,
    key_spatial: Sequence[int] | None,
    kernel: Sequence[int] | None,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(query grid, key grid, pooling kernel) of an attention source: a cache's own, else
    the given ones, with the image's grid as the default query grid."""
    from ..viz import _grids, _is_cache

    if spatial is None and not _is_cache(source):
        if image_spatial is None:
            raise ValueError("give the image, or the query grid spatial=(h, w) or (T, h, w)")
        spatial = image_spatial
    return _grids(source, spatial, key_spatial, kernel)


# --------------------------------------------------------------------------- encoding


def _b64(array: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


#: The binary fields of a layer that the page decodes; one equal to an earlier layer's is
#: stored as {"sameAs": index of that layer}.
BINARY_FIELDS = ("rows", "lo", "hi", "entropy", "distance", "top", "topWeight")


def _stored_once(entry: dict[str, Any], earlier: list[dict[str, Any]]) -> dict[str, Any]:
    """``entry`` with each binary field that an earlier layer already holds replaced by a
    reference to it (the Gaussian and the embedded Gaussian with identity embeddings have
    the same rows)."""
    for key in BINARY_FIELDS:
        value = entry.get(key)
        if not isinstance(value, str):
            continue
        for k, other in enumerate(earlier):
            if other.get(key) == value:
                entry[key] = {"sameAs": k}
                break
    return entry


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _quantise(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lo, hi, q) of host rows (k, N′): the page's 8-bit code (module docstring)."""
    lo = rows.min(axis=1)
    hi = rows.max(axis=1)
    span = hi - lo
    t = (rows - lo[:, None]) / np.where(span > 0, span, 1.0)[:, None]
    q = np.rint(255.0 * np.sqrt(np.clip(t, 0.0, 1.0))).astype(np.uint8)
    return lo, hi, q


def _top_keys(rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest keys of host rows (k', N′), largest first (ties: smaller index first);
    as :func:`nlref.analysis.top_keys`, by partition rather than a full sort."""
    if k < rows.shape[1]:
        index = np.argpartition(-rows, k - 1, axis=1)[:, :k]
    else:
        index = np.broadcast_to(np.arange(rows.shape[1]), rows.shape)
    weight = np.take_along_axis(rows, index, axis=1)
    order = np.lexsort((index, -weight))  # along each row: by weight, then by index
    return np.take_along_axis(index, order, 1), np.take_along_axis(weight, order, 1)


def _host_vector(values: Any, batch: int, n_keys: int, name: str) -> np.ndarray:
    v = np.asarray(to_numpy(values), dtype=np.float64)
    if v.ndim == 2:
        v = v[batch]
    if v.shape != (n_keys,):
        raise ValueError(f"map {name!r} must have N′={n_keys} values, got shape {v.shape}")
    return v


def _row_blocks(rows: Any) -> tuple[int, int]:
    """(rows per block, number of blocks) in which a layer's rows are read: about
    :data:`nlref.analysis.BLOCK_BYTES` of float64 a block."""
    b, n, n_keys = analysis.attention_shape(rows)
    step = max(1, analysis.BLOCK_BYTES // (8 * b * n_keys))
    return step, math.ceil(n / step)


def _encode_layer(
    name: str,
    layer: Layer,
    batch: int,
    n_keys: int,
    top_k: int,
    advance: Callable[[int], None],
) -> tuple[dict[str, Any], float]:
    """The JSON of one layer, and its query dependence."""
    entry: dict[str, Any] = {"name": name, "label": layer.label, "rows": None, "maps": []}
    dependence = math.nan
    maps = dict(layer.maps)
    if layer.rows is not None:
        b, _, _ = analysis.attention_shape(layer.rows)
        if not 0 <= batch < b:
            raise ValueError(f"batch={batch} outside [0, B={b})")
        step, blocks = _row_blocks(layer.rows)
        summary = analysis.summarise(layer.rows, rows_per_block=step)
        advance(2 * blocks)
        host = {k: to_numpy(getattr(summary, k))[batch] for k in ("entropy", "distance")}
        dependence = float(to_numpy(summary.query_dependence)[batch])
        packer = zlib.compressobj(6)
        packed, lows, highs, tops, weights = [], [], [], [], []
        for rows in analysis.row_blocks(layer.rows, step):
            part = np.asarray(to_numpy(rows[batch, ...]), dtype=np.float64)
            lo, hi, q = _quantise(part)
            packed.append(packer.compress(q.tobytes()))
            lows.append(lo)
            highs.append(hi)
            index, weight = _top_keys(part, top_k)
            tops.append(index)
            weights.append(weight)
            advance(1)
        packed.append(packer.flush())
        entry.update(
            rows=base64.b64encode(b"".join(packed)).decode("ascii"),
            lo=_b64(np.concatenate(lows), "<f8"),
            hi=_b64(np.concatenate(highs), "<f8"),
            entropy=_b64(host["entropy"], "<f4"),
            distance=_b64(host["distance"], "<f4"),
            top=_b64(np.concatenate(tops), "<u2" if n_keys <= 2**16 else "<u4"),
            topWeight=_b64(np.concatenate(weights), "<f4"),
            summary={
                "queryDependence": _finite(dependence),
                "meanEntropy": _finite(float(np.nanmean(host["entropy"])))
                if np.isfinite(host["entropy"]).any()
                else None,
            },
        )
        maps.setdefault("mean row", (summary.mean_row, "the mean of the rows (as distributions)"))
        maps.setdefault("received", (summary.received, "attention each key receives (Σᵢ Aᵢⱼ)"))
    for map_name, value in maps.items():
        values, description = value if isinstance(value, tuple) else (value, map_name)
        entry["maps"].append(
            {
                "name": map_name,
                "description": description,
                "values": _b64(_host_vector(values, batch, n_keys, map_name), "<f8"),
            }
        )
    return entry, dependence


def _as_frames(image: Any, spatial: tuple[int, ...]) -> tuple[list[np.ndarray], tuple[int, int]]:
    """The frames to show (H, W, 3) in [0, 1], and their size in pixels."""
    from ..demo.photo import as_rgb

    if image is None:  # plain grey frames, one pixel per query cell
        h, w = spatial[-2:]
        grey = np.full((h, w, 3), 0.5)
        return [grey] * (spatial[0] if len(spatial) == 3 else 1), (h, w)
    arr = np.asarray(to_numpy(image))
    if len(spatial) == 3:
        if arr.ndim == 3:
            arr = arr[..., None]
        if arr.ndim != 4 or arr.shape[0] != spatial[0]:
            raise ValueError(
                f"a clip for the query grid {spatial} must have shape (T={spatial[0]}, H, W, 3), "
                f"got {arr.shape}"
            )
        frames = [as_rgb(f) for f in arr]
    else:
        if arr.ndim not in (2, 3):
            raise ValueError(f"expected an image (H, W) or (H, W, 3), got shape {arr.shape}")
        frames = [as_rgb(arr)]
    return frames, frames[0].shape[:2]


def _data_uri(frame: np.ndarray, max_side: int) -> str:
    """The frame as a data: URI, PNG or JPEG (whichever is smaller), at most max_side."""
    try:
        from PIL import Image
    except ImportError as err:
        raise ImportError(f"the explorer encodes its image with Pillow: {VIZ_HINT}") from err
    import io

    img = Image.fromarray(np.rint(frame * 255).astype(np.uint8))
    if max(img.size) > max_side:
        factor = max_side / max(img.size)
        size = (max(1, round(img.size[0] * factor)), max(1, round(img.size[1] * factor)))
        img = img.resize(size, Image.Resampling.LANCZOS)
    best = ""
    for fmt, mime, options in (
        ("PNG", "image/png", {"optimize": True}),
        ("JPEG", "image/jpeg", {"quality": 88}),
    ):
        buffer = io.BytesIO()
        img.save(buffer, format=fmt, **options)
        uri = f"data:{mime};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        best = uri if not best or len(uri) < len(best) else best
    return best


def _page(data: dict[str, Any], title: str) -> str:
    from .. import __version__

    folder = resources.files(__name__)
    template = folder.joinpath("explorer.html").read_text(encoding="utf-8")
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    payload = payload.replace("</", "<\\/")  # never close the <script> early
    parts = {
        "/*NLREF_VERSION*/": html.escape(__version__),
        "/*NLREF_TITLE*/": html.escape(title),
        "/*NLREF_CSS*/": folder.joinpath("explorer.css").read_text(encoding="utf-8"),
        "/*NLREF_JS*/": folder.joinpath("explorer.js").read_text(encoding="utf-8"),
        "/*NLREF_DATA*/": payload,
    }
    page = template
    for marker, text in parts.items():  # the data last: it is the largest, and never parsed
        head, sep, tail = page.partition(marker)
        if not sep:
            raise RuntimeError(f"the explorer template lost its {marker} marker")
        page = head + text + tail
    return page


# --------------------------------------------------------------------------- public API


def _variant_label(name: str) -> str:
    from ..pairwise import get as get_pairwise

    try:
        variant = get_pairwise(name)
    except ValueError:
        return ""
    return f"{variant.formula}" + (" · rows sum to 1" if variant.softmax else "")


def explore(
    image: Array | None,
    attention: Any,
    *,
    spatial: Sequence[int] | None = None,
    key_spatial: Sequence[int] | None = None,
    kernel: Sequence[int] | None = None,
    batch: int = 0,
    title: str | None = None,
    top_k: int = 5,
    progress: bool | None = False,
    side_by_side: bool = False,
) -> Explorer:
    """An explorer of ``attention`` over ``image``.

    Parameters
    ----------
    image : array (H, W), (H, W, 3), a clip (T, H, W, 3), or None
        Shown under the maps, at any resolution: the query grid is stretched over it, and
        pixel coordinates are those of this array. None: grey frames.
    attention : array, forward cache, Layer, or a mapping of them
        An attention (B, N, N′), a cache of :func:`nlref.forward` (tiled ones included:
        rows are read with ``cache.attention_rows``), or name -> one of these (a variant
        switcher is shown). A single one is named after its cache's pairwise function, or
        "attention".
    spatial : sequence of int, optional
        The query grid (h, w) or (T, h, w); default the cache's, else the image's.
    key_spatial, kernel : sequence of int, optional
        The key grid and its pooling kernel; default the cache's, else inferred as by
        :func:`nlref.viz.attention_row`.
    batch : int
        Which sample of the batch.
    title : str, optional
    top_k : int
        How many of the largest keys the side panel lists.
    progress : bool or None
        A progress bar on stderr (None: when stderr is a terminal).
    side_by_side : bool
        Draw every layer at once, one panel each, on one colour scale (an image, not a
        clip): the selected query's row in each layer with rows, the query-independent
        map of each layer without.

    Returns
    -------
    Explorer

    Raises
    ------
    ValueError
        If the grids do not match the attention, or the layers disagree on them.
    """
    from ..progress import progress as progress_bar

    layers = _as_layers(attention)
    image_spatial = None
    if image is not None:
        shape = tuple(np.shape(to_numpy(image)))
        clip = len(shape) == 4 or (spatial is not None and len(spatial) == 3)
        image_spatial = shape[:3] if clip else shape[:2]
    grids = None
    for name, layer in layers.items():
        if layer.rows is None:
            continue
        found = _grids(layer.rows, image_spatial, spatial, key_spatial, kernel)
        if grids is not None and found != grids:
            raise ValueError(
                f"layer {name!r} has query grid, key grid and kernel {found}, but an earlier "
                f"layer has {grids}: every layer of one explorer shares its grids"
            )
        grids = found
    if grids is None:
        raise ValueError("give at least one layer with per-query rows")
    q_grid, k_grid, kern = grids
    n_keys = math.prod(k_grid)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    top_k = min(top_k, n_keys)
    frames, pixels = _as_frames(image, q_grid)
    max_side = MAX_FRAME_SIDE if len(q_grid) == 3 else MAX_IMAGE_SIDE
    total = sum(3 * _row_blocks(la.rows)[1] for la in layers.values() if la.rows is not None)
    entries, dependence = [], {}
    with progress_bar(total=total, desc="explorer", unit="block", enabled=progress) as bar:
        for name, layer in layers.items():
            entry, dep = _encode_layer(name, layer, batch, n_keys, top_k, bar.update)
            entries.append(_stored_once(entry, entries))
            dependence[name] = dep
    axes = ["t", "y", "x"] if len(q_grid) == 3 else ["y", "x"]
    title = title or f"nlref attention explorer: {', '.join(layers)}"
    data = {
        "format": 1,
        "title": title,
        "frames": [_data_uri(f, max_side) for f in frames],
        "pixels": [int(pixels[0]), int(pixels[1])],
        "pixelated": max(pixels) < PIXELATED_BELOW,
        "axes": axes,
        "queries": list(q_grid),
        "keys": list(k_grid),
        "kernel": list(kern),
        "pooled": any(k > 1 for k in kern),
        "topK": top_k,
        "quantisation": QUANTISATION,
        "variants": entries,
        "sideBySide": bool(side_by_side) and len(q_grid) == 2,
    }
    height = 760 if len(q_grid) == 2 else 640
    return Explorer(_page(data, title), dependence, height)


def _as_layers(attention: Any) -> dict[str, Layer]:
    def one(value: Any) -> Layer:
        if isinstance(value, Layer):
            return value
        return Layer(rows=value)

    if isinstance(attention, Mapping):
        if not attention:
            raise ValueError("the mapping of attentions is empty")
        layers = {str(k): one(v) for k, v in attention.items()}
    else:
        cfg = getattr(attention, "cfg", None)
        layers = {cfg.pairwise if cfg is not None else "attention": one(attention)}
    return {
        name: layer if layer.label else Layer(layer.rows, _variant_label(name), layer.maps)
        for name, layer in layers.items()
    }


def estimate_bytes(n: int, n_keys: int, layers: int = 1, *, top_k: int = 5) -> int:
    """An upper bound on the page's size for N queries, N′ keys and ``layers`` layers.

    Per layer, in base64 (4/3 of the bytes): one byte a (query, key) pair (deflate adds
    at most a few bytes per 64 KiB to data it cannot compress); per query its lo and hi
    (float64), entropy and distance (float32) and ``top_k`` keys (a 16-bit index, 32-bit
    above 2¹⁶ keys, and a float32 weight); per key its two maps (float64). Plus 0.5 MiB
    for the picture and the code.
    """
    index = 2 if n_keys <= 2**16 else 4
    per_layer = n * n_keys * (1 + 2**-12) + n * (24 + top_k * (index + 4)) + 16 * n_keys
    return math.ceil(layers * per_layer * 4 / 3) + 2**19


def _variants(pairwise: str | Sequence[str]) -> list[str]:
    from ..pairwise import names

    if isinstance(pairwise, str):
        return names() if pairwise == "all" else [pairwise]
    chosen = list(dict.fromkeys(pairwise))
    return names() if "all" in chosen else chosen


def from_image(
    image: Array | str | Path,
    *,
    pairwise: str | Sequence[str] = "gaussian",
    size: int = 48,
    sub_sample: int = 1,
    scale: float | None = 6.0,
    position_weight: float = 0.25,
    title: str | None = None,
    progress: bool | None = False,
) -> Explorer:
    """An explorer of the demo's hand-set block on an image's colour + position features.

    The image is averaged down to at most ``size`` cells on its longer side
    (:func:`nlref.demo.photo.downsample`), each cell described by its colour and position
    on a sphere (:func:`nlref.demo.photo.pixel_features`), and :func:`nlref.forward` runs
    each pairwise function with the hand-set weights of
    :func:`nlref.demo.photo.hand_set_params`.

    Parameters
    ----------
    image : array (H, W), (H, W, 3) or (H, W, 4), or path
        Floats in [0, 1], or integers (uint8, uint16) scaled by their type's maximum.
        Coordinates in the page are this image's pixels.
    pairwise : str or sequence of str
        A variant name, several, or "all".
    size : int
        Longer side of the feature grid.
    sub_sample : int
        Max-pool the keys k×k (1: off).
    scale : float or None
        α of the variants that use one (the concatenation has none).
    position_weight : float
        Weight of the position features against colour.
    """
    image, feats, factor = image_features(image, size, position_weight)
    h, w = feats.spatial
    kernel = None if sub_sample == 1 else (sub_sample, sub_sample)
    pooled = f", keys pooled {sub_sample}×{sub_sample}" if kernel else ""
    return _explore_features(
        image[: h * factor, : w * factor],  # the pixels the grid covers
        feats.x,
        pairwise=pairwise,
        scale=scale,
        kernel=kernel,
        title=title or f"attention on colour + position features ({h}×{w} grid{pooled})",
        progress=progress,
    )


def image_features(
    image: Array | str | Path, size: int, position_weight: float
) -> tuple[np.ndarray, Any, int]:
    """An image (array or file) as RGB in [0, 1] (:func:`nlref.demo.photo.as_rgb`: integer
    images are divided by their type's maximum), its colour + position features on a grid
    of at most ``size`` cells a side (:func:`nlref.demo.photo.pixel_features`), and the
    downsampling factor (pixels per cell)."""
    from ..demo import photo

    if isinstance(image, (str, Path)):
        image = photo.load_image(image)
    image = photo.as_rgb(np.asarray(to_numpy(image)))
    small, factor = photo.downsample(image, size)
    return image, photo.pixel_features(small, position_weight=position_weight), factor


def _explore_features(
    shown: np.ndarray,
    x: np.ndarray,
    *,
    pairwise: str | Sequence[str],
    scale: float | None,
    kernel: tuple[int, ...] | None,
    title: str,
    progress: bool | None,
) -> Explorer:
    """The explorer of the hand-set block of each variant on features x over ``shown``."""
    from ..demo import photo

    variants = _variants(pairwise)
    caches = photo.block_caches(
        x, variants=variants, scale=scale, sub_sample=kernel, progress=progress
    )
    return explore(shown, caches, title=title, progress=progress)


def from_clip(
    clip: Array | None = None,
    *,
    pairwise: str | Sequence[str] = "gaussian",
    size: int = 24,
    sub_sample: int = 1,
    scale: float | None = 6.0,
    position_weight: float = 0.25,
    title: str | None = None,
    progress: bool | None = False,
) -> Explorer:
    """An explorer of a clip (T, H, W, 3): a query in frame t, its map across all frames.

    ``clip=None`` uses the demo's synthetic clip (:func:`nlref.demo.photo.synthetic_clip`,
    6 frames of 24×24). Frames are averaged down to at most ``size`` cells a side; the
    keys are pooled (1, k, k) with ``sub_sample=k`` (space, not time). Other parameters as
    :func:`from_image`.
    """
    from ..demo import photo

    if clip is None:
        clip, _ = photo.synthetic_clip()
    frames = np.asarray(to_numpy(clip))
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected a clip of shape (T, H, W, 3), got {frames.shape}")
    frames = np.stack([photo.as_rgb(f) for f in frames])
    small, factor = photo.downsample(np.moveaxis(frames, 0, 2), size)  # (h, w, T, 3)
    small = np.moveaxis(small, 2, 0)
    feats = photo.pixel_features(small, position_weight=position_weight)
    t, h, w = feats.spatial
    kernel = None if sub_sample == 1 else (1, sub_sample, sub_sample)
    pooled = f", keys pooled 1×{sub_sample}×{sub_sample}" if kernel else ""
    return _explore_features(
        frames[:, : h * factor, : w * factor],
        feats.x,
        pairwise=pairwise,
        scale=scale,
        kernel=kernel,
        title=title or f"space-time attention ({t}×{h}×{w} grid{pooled})",
        progress=progress,
    )


@contextmanager
def capture(module: Any) -> Iterator[list[Any]]:
    """Record the input of a PyTorch module during the forwards run inside the block.

    A forward pre-hook appends each call's first positional argument (detached, on the
    CPU) to the list this yields; the hook is removed on exit::

        with nlref.explore.capture(model.layer3[1].nonlocal_block) as inputs:
            model(batch)
        page = nlref.explore.from_torch(model.layer3[1].nonlocal_block, inputs[0], image)
    """
    seen: list[Any] = []

    def hook(_module: Any, args: tuple[Any, ...]) -> None:
        seen.append(args[0].detach().cpu())

    handle = module.register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def from_torch(
    module: Any,
    x: Any,
    image: Array | None = None,
    *,
    batch: int = 0,
    title: str | None = None,
    progress: bool | None = False,
    **cfg_overrides: Any,
) -> Explorer:
    """The explorer of a PyTorch Non-local module's attention on its input x.

    The module's config and weights are read by :func:`nlref.interop.torch.from_torch`
    (``cfg_overrides`` are passed on), then :func:`nlref.forward` runs on x in float64, in
    evaluation mode: the attention shown is the module's own, computed by nlref.

    Parameters
    ----------
    module : torch.nn.Module
        A Non-local block that nlref reads (mmcv, timm, pytorchvideo, AlexHex7 layouts).
    x : torch.Tensor or array, shape (B, C, \\*S)
        The block's input, e.g. from :func:`capture`.
    image : array, optional
        The picture (or clip) the input came from, at any resolution.
    """
    from .. import api
    from ..interop import torch as interop_torch

    cfg, params = interop_torch.from_torch(module, **cfg_overrides)
    host = x.detach().cpu().double().numpy() if hasattr(x, "detach") else np.asarray(x)
    _, cache = api.forward(np.asarray(host, dtype=np.float64), params, cfg, training=False)
    return explore(
        image,
        {cfg.pairwise: cache},
        batch=batch,
        title=title or f"{type(module).__name__}: {cfg.pairwise} attention",
        progress=progress,
    )


from .family import from_family  # noqa: E402  (it builds on the functions above)
