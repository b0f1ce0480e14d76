r"""Meaningful attention without training: per-pixel features of a photo or a clip.

A Non-local block with random weights attends to noise. To *see* what the pairwise
functions do, feed them features with a meaning: the colour of each pixel, plus (a little
of) its position, and use hand-set weights.

Why the features are put on a sphere
------------------------------------
The Gaussian's attention is :math:`\operatorname{softmax}_j(\alpha\,x_i^\top x_j)`. Since

.. math::

    x_i^\top x_j = \tfrac12\big(\|x_i\|^2 + \|x_j\|^2 - \|x_i - x_j\|^2\big)

and the :math:`\|x_i\|^2` term is the same for every key j (it cancels in the softmax), the
attention is :math:`\operatorname{softmax}_j(-\tfrac\alpha2\|x_i - x_j\|^2)` exactly when
every :math:`\|x_j\|` is the same. :func:`pixel_features` therefore appends one channel
:math:`\sqrt{R^2 - \|u_j\|^2}` to the raw features u (colour, position), which makes every
norm R: then a query attends to the pixels whose colour (and position) is *closest* to its
own, wherever they are in the image. Without this, bright pixels (large norm) would win
every softmax.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._backend import Array
from ..api import forward as block_forward
from ..config import NonLocalConfig
from ..pairwise import get as get_pairwise
from ..pairwise import names as pairwise_names

__all__ = [
    "SAMPLE_PHOTO",
    "PixelFeatures",
    "as_rgb",
    "attention_by_variant",
    "block_caches",
    "downsample",
    "grid_shape",
    "hand_set_params",
    "image_size",
    "load_image",
    "pixel_features",
    "sample_photo_path",
    "synthetic_clip",
    "variant_config",
]

#: The photo that matplotlib ships in its sample data (Grace Hopper, 600×512, public domain).
SAMPLE_PHOTO = "grace_hopper.jpg"

VIZ_HINT = "install the viz extra: pip install 'nlref[viz]' (matplotlib, which brings Pillow)"


def sample_photo_path() -> Path:
    """The path of matplotlib's sample photo (no network needed: it ships with matplotlib).

    Raises
    ------
    ImportError
        If matplotlib is not installed.
    """
    try:
        from matplotlib import cbook
    except ImportError as err:
        raise ImportError(f"the sample photo comes with matplotlib; {VIZ_HINT}") from err
    return Path(cbook.get_sample_data(SAMPLE_PHOTO, asfileobj=False))


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as an (H, W, 3) float64 array in [0, 1].

    PNG is read by matplotlib itself, every other format (JPEG, BMP, TIFF, GIF, WebP, ...)
    through Pillow, which matplotlib depends on. Greyscale images are repeated over three
    channels; an alpha channel is composited over white.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file cannot be decoded as an image.
    ImportError
        If matplotlib is not installed.
    """
    try:
        from matplotlib import image as mpimg
    except ImportError as err:
        raise ImportError(f"reading images needs matplotlib; {VIZ_HINT}") from err
    return as_rgb(_read(path, lambda p: np.asarray(mpimg.imread(p))))


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file, from its header only (fast, for estimates).

    Raises
    ------
    FileNotFoundError, ValueError
        As :func:`load_image`.
    ImportError
        If Pillow is not installed.
    """
    try:
        from PIL import Image
    except ImportError as err:
        raise ImportError(f"reading images needs Pillow; {VIZ_HINT}") from err

    def size(p: Path) -> tuple[int, int]:
        with Image.open(p) as im:
            width, height = im.size
        return int(height), int(width)

    return _read(path, size)


def _read(path: str | Path, read: Any) -> Any:
    """``read(path)``, with a missing file and an undecodable one said plainly."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image file at {str(path)!r}")
    try:
        return read(path)
    except Exception as err:  # Pillow's UnidentifiedImageError, OSError, SyntaxError...
        raise ValueError(
            f"cannot read {str(path)!r} as an image ({type(err).__name__}: {err})"
        ) from err


def as_rgb(raw: np.ndarray) -> np.ndarray:
    """Convert an image array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) to (H, W, 3) in [0, 1]."""
    img = np.asarray(raw)
    if np.issubdtype(img.dtype, np.integer):
        img = img / float(np.iinfo(img.dtype).max)
    img = img.astype(np.float64)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4) or min(img.shape[:2]) < 1:
        raise ValueError(f"expected an image of shape (H, W), (H, W, 1|3|4), got {raw.shape}")
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif img.shape[2] == 4:
        alpha = img[:, :, 3:]
        img = img[:, :, :3] * alpha + (1.0 - alpha)  # over a white background
    return np.clip(img, 0.0, 1.0)


def grid_shape(height: int, width: int, max_side: int) -> tuple[tuple[int, int], int]:
    """The grid (h, w) and factor f that :func:`downsample` gives an image of that size,
    without touching any pixel (for estimates before the work)."""
    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 2:
        raise ValueError(f"max_side must be an int >= 2, got {max_side!r}")
    f = max(1, math.ceil(max(height, width) / max_side))
    return (height // f, width // f), f


def downsample(image: np.ndarray, max_side: int) -> tuple[np.ndarray, int]:
    """Average f×f blocks of ``image`` (H, W, ...) so that its longer side is ≤ ``max_side``.

    Returns
    -------
    small : ndarray, shape (H // f, W // f, ...)
        Rows and columns that do not fill a block are dropped.
    f : int
        The integer factor, ``ceil(max(H, W) / max_side)`` (1 when already small enough).
    """
    h, w = image.shape[:2]
    (hs, ws), f = grid_shape(h, w, max_side)
    if f == 1:
        return np.asarray(image, dtype=np.float64), 1
    if hs < 1 or ws < 1:
        raise ValueError(f"image {h}x{w} is too narrow to downsample by {f}")
    crop = np.asarray(image[: hs * f, : ws * f], dtype=np.float64)
    blocks = crop.reshape(hs, f, ws, f, *image.shape[2:])
    return blocks.mean(axis=(1, 3)), f


@dataclass(frozen=True)
class PixelFeatures:
    """Per-pixel features of an image or a clip, ready for :func:`nlref.forward`.

    Attributes
    ----------
    x : ndarray, shape (1, C, *S)
        S = (h, w) for an image, (T, h, w) for a clip; C = 3 colour + len(S) position + 1.
    image : ndarray, shape (*S, 3)
        The (downsampled) pixels the features describe, for plotting.
    channels : tuple of str
        The name of each channel of x.
    """

    x: np.ndarray
    image: np.ndarray
    channels: tuple[str, ...]

    @property
    def spatial(self) -> tuple[int, ...]:
        """S, the spatial shape of x."""
        return tuple(self.x.shape[2:])


def pixel_features(
    image: np.ndarray, *, colour_weight: float = 1.0, position_weight: float = 0.25
) -> PixelFeatures:
    """Colour and position features on a sphere, for an image (h, w, 3) or clip (T, h, w, 3).

    u_j = [colour_weight · (RGB_j − mean) / std, position_weight · coordinates_j], where the
    coordinates run over [−1, 1] along the longest axis (the frame axis of a clip counts as
    a position too), then x_j = [u_j, √(R² − ‖u_j‖²)] with R = maxⱼ ‖u_j‖ (see the module
    docstring: the Gaussian then attends by distance in u).
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim not in (3, 4) or img.shape[-1] != 3:
        raise ValueError(f"expected an image (h, w, 3) or a clip (T, h, w, 3), got {img.shape}")
    for name, value in (("colour_weight", colour_weight), ("position_weight", position_weight)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    spatial = img.shape[:-1]
    colour = img.reshape(-1, 3)
    std = colour.std()
    colour = (colour - colour.mean(axis=0)) / (std if std > 0 else 1.0)  # one std: keeps hue
    longest = max(spatial)
    axes = [np.linspace(-1.0, 1.0, n) * (n - 1) / max(longest - 1, 1) for n in spatial]
    grids = np.meshgrid(*axes, indexing="ij")
    position = np.stack([g.reshape(-1) for g in grids], axis=1)
    u = np.concatenate([colour_weight * colour, position_weight * position], axis=1)
    sq = np.sum(u * u, axis=1)
    lift = np.sqrt(np.maximum(sq.max() - sq, 0.0))  # every ||x_j|| is now R
    x = np.concatenate([u, lift[:, None]], axis=1).T.reshape(1, -1, *spatial)
    names = ("t", "y", "x") if len(spatial) == 3 else ("y", "x")
    channels = ("r", "g", "b", *(f"pos_{n}" for n in names), "lift")
    return PixelFeatures(x=x, image=img, channels=channels)


def hand_set_params(cfg: NonLocalConfig, *, xp: Any = None) -> dict[str, Array]:
    """Weights that make every variant compare the features themselves.

    θ = φ = g = identity (so ``cfg.inter_channels`` must equal ``cfg.in_channels``): the
    embedded Gaussian then equals the Gaussian, and the dot product is α xᵢᵀxⱼ / N′. For
    the concatenation, w_θ = w_φ = the brightness direction (R + G + B)/√3: its map
    ReLU(w_θᵀxᵢ + w_φᵀxⱼ)/N′ is a sum of a query term and a key term, so it ranks the keys
    the same way for every query. W_z = 0 and no norm: the block's output is x, and only
    the attention matters here.
    """
    c = cfg.in_channels
    if cfg.embeds and cfg.inter_channels != c:
        raise ValueError(
            f"hand-set identity embeddings need inter_channels == in_channels, got "
            f"C′={cfg.inter_channels} and C={c}"
        )
    if cfg.norm is not None or cfg.biases:
        raise ValueError("hand_set_params expects norm=None and biases=() in the config")
    ci = cfg.inter_channels
    host: dict[str, np.ndarray] = {}
    if cfg.embeds:
        host["theta.weight"] = np.eye(ci, c)
        host["phi.weight"] = np.eye(ci, c)
    host["g.weight"] = np.eye(ci, c)
    if "concat.weight" in get_pairwise(cfg.pairwise).extra_params(ci):
        brightness = np.zeros(ci)
        brightness[:3] = 1.0 / np.sqrt(3.0)
        host["concat.weight"] = np.concatenate([brightness, brightness])
    host["z.weight"] = np.zeros((c, ci))
    if xp is None:
        return host
    return {n: xp.asarray(v, dtype=xp.float64) for n, v in host.items()}


def variant_config(
    name: str,
    channels: int,
    *,
    scale: float | None = 4.0,
    sub_sample: tuple[int, ...] | None = None,
) -> NonLocalConfig:
    """The config of the hand-set block of variant ``name`` on ``channels`` features.

    θ, φ, g keep every channel (C′ = C), no norm, no biases; ``scale`` goes to the
    variants that use one and is left out for the others (the concatenation).
    """
    variant = get_pairwise(name)
    return NonLocalConfig(
        in_channels=channels,
        inter_channels=channels,
        pairwise=name,
        scale=scale if variant.uses_scale else None,
        sub_sample=sub_sample,
        norm=None,
        biases=(),
    )


def block_caches(
    x: Array,
    *,
    variants: Sequence[str] | None = None,
    scale: float | None = 4.0,
    sub_sample: tuple[int, ...] | None = None,
    chunk_size: int | None = None,
    progress: bool | None = False,
) -> dict[str, Any]:
    """Run :func:`nlref.forward` once per pairwise variant on x and return the caches.

    Parameters
    ----------
    x : array, shape (B, C, *S)
        Features, e.g. :attr:`PixelFeatures.x` (any array-API backend).
    variants : sequence of str, optional
        Default: every registered variant.
    scale : float or None
        α for the variants that use it (Gaussian, embedded Gaussian, dot product).
    sub_sample : tuple of int, optional
        Max-pool of the keys, as in :class:`nlref.NonLocalConfig`.
    chunk_size : int, optional
        Passed to :func:`nlref.forward`; None lets it tile large attentions by itself.
    progress : bool or None
        A progress bar over the variants on stderr (None: when stderr is a terminal).

    Returns
    -------
    dict
        Variant name -> the forward's cache (:class:`nlref.BlockCache`, or an
        :class:`nlref.engine.EngineCache` whose attention may be tiled: read its rows with
        ``cache.attention_rows``).
    """
    import array_api_compat

    from ..progress import progress as progress_bar

    xp = array_api_compat.array_namespace(x)
    out: dict[str, Any] = {}
    names = list(variants or pairwise_names())
    for name in progress_bar(names, desc="forward", unit="variant", enabled=progress):
        cfg = variant_config(name, x.shape[1], scale=scale, sub_sample=sub_sample)
        params = {
            n: xp.asarray(v, dtype=x.dtype, device=array_api_compat.device(x))
            for n, v in hand_set_params(cfg).items()
        }
        _, out[name] = block_forward(x, params, cfg, training=False, chunk_size=chunk_size)
    return out


def attention_by_variant(
    x: Array,
    *,
    variants: Sequence[str] | None = None,
    scale: float | None = 4.0,
    sub_sample: tuple[int, ...] | None = None,
) -> dict[str, Array]:
    """Run :func:`nlref.forward` once per pairwise variant on x and return the attentions.

    Parameters as :func:`block_caches`; the whole attention of each variant is held, so
    this is for inputs whose attention fits in memory (N·N′ up to about 10⁷).

    Returns
    -------
    dict
        Variant name -> attention of shape (B, N, N′), in x's array library.
    """
    n = math.prod(x.shape[2:])
    caches = block_caches(x, variants=variants, scale=scale, sub_sample=sub_sample, chunk_size=n)
    return {name: cache.attention for name, cache in caches.items()}


def synthetic_clip(
    frames: int = 6, size: int = 24, rng: int | np.random.Generator | None = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A short synthetic clip: a red ball crossing a textured background.

    Returns
    -------
    clip : ndarray, shape (frames, size, size, 3), values in [0, 1]
        A smooth blue-green background with noise, two static yellow squares, and a red
        ball of radius size/8 that moves left to right and down.
    centres : ndarray, shape (frames, 2)
        The ball's (row, col) in each frame, as ints.
    """
    if frames < 1 or size < 8:
        raise ValueError(f"need frames >= 1 and size >= 8, got frames={frames}, size={size}")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    background = np.stack([0.15 + 0.1 * xx, 0.35 + 0.3 * yy, 0.55 + 0.2 * (1 - xx)], axis=-1)
    clip = np.repeat(background[None], frames, axis=0)
    clip = clip + 0.03 * gen.standard_normal(clip.shape)
    sq = max(size // 8, 2)
    for r0, c0 in ((size // 8, size - size // 4), (size - size // 4, size // 8)):
        clip[:, r0 : r0 + sq, c0 : c0 + sq] = (0.9, 0.85, 0.2)
    radius = size / 8
    rows = np.linspace(size * 0.3, size * 0.6, frames)
    cols = np.linspace(size * 0.15, size * 0.85, frames)
    for t in range(frames):
        ball = (np.mgrid[0:size, 0:size][0] - rows[t]) ** 2 + (
            np.mgrid[0:size, 0:size][1] - cols[t]
        ) ** 2 <= radius**2
        clip[t][ball] = (0.9, 0.1, 0.1)
    centres = np.stack([np.round(rows), np.round(cols)], axis=1).astype(np.int64)
    return np.clip(clip, 0.0, 1.0), centres
