"""Explorer pages for the tests, and what a page must hold to match nlref's own rows."""

from __future__ import annotations

import base64
import json
import re
import zlib
from typing import Any

import numpy as np

from nlref.demo import photo

#: The size case of the explorer: a 64×64 query grid over a pooled 32×32 key grid.
BIG = {"size": 64, "sub_sample": 2, "pairwise": "all"}
BIG_LIMIT_BYTES = 10 * 10**6


def square_photo() -> np.ndarray:
    """The sample photo cropped to 512×512 (a 64×64 grid at --size 64)."""
    return photo.load_image(photo.sample_photo_path())[:512, :512]


def caches_like_from_image(image: np.ndarray, *, size: int, sub_sample: int, pairwise: Any,
                           scale: float = 6.0) -> dict[str, Any]:  # fmt: skip
    """The forward caches that :func:`nlref.explore.from_image` draws, computed again."""
    from nlref.pairwise import names

    small, _ = photo.downsample(image, size)
    feats = photo.pixel_features(small)
    kernel = None if sub_sample == 1 else (sub_sample, sub_sample)
    variants = names() if pairwise == "all" else [pairwise]
    return photo.block_caches(feats.x, variants=variants, scale=scale, sub_sample=kernel)


def bound(true_row: np.ndarray) -> np.ndarray:
    """Per entry, the most the page's 8-bit code (sqrt-uint8) may differ from the row.

    With t = (a - lo)/(hi - lo), s = sqrt(t) and q = round(255 s): |q/255 - s| <= 1/510,
    so |(q/255)^2 - t| <= (2 s + 1/510)/510.
    """
    lo, hi = float(true_row.min()), float(true_row.max())
    span = hi - lo
    t = (true_row - lo) / (span if span > 0 else 1.0)
    return span * (2 * np.sqrt(np.clip(t, 0, 1)) + 1 / 510) / 510 + 1e-12 * abs(hi)


def page_data(html: str) -> dict[str, Any]:
    """The JSON the page carries."""
    found = re.search(r'<script id="nlref-data" type="application/json">(.*?)</script>', html, re.S)
    assert found, "no data block in the page"
    return json.loads(found.group(1).replace("<\\/", "</"))


def field(data: dict[str, Any], index: int, key: str) -> bytes:
    """A binary field of layer ``index``, following {"sameAs": k} references."""
    value = data["variants"][index][key]
    while isinstance(value, dict):
        value = data["variants"][value["sameAs"]][key]
    return base64.b64decode(value)


def decoded_rows(data: dict[str, Any], index: int) -> np.ndarray:
    """Layer ``index``'s rows (N, N′) as the page decodes them."""
    n_keys = int(np.prod(data["keys"]))
    q = np.frombuffer(zlib.decompress(field(data, index, "rows")), np.uint8).reshape(-1, n_keys)
    lo = np.frombuffer(field(data, index, "lo"), "<f8")[:, None]
    hi = np.frombuffer(field(data, index, "hi"), "<f8")[:, None]
    s = q / 255.0
    return lo + s * s * (hi - lo)
