r"""The explorer of the Non-local block's successors: GCNet and the disentangled block.

:func:`from_family` runs the hand-set blocks of :mod:`nlref.demo.family` on an image's
colour + position features and shows them **side by side** with the plain embedded
Gaussian, one panel each, for the query under the pointer:

- ``gcnet``: the embedded Gaussian's row, and GCNet's single map α, the same for every
  query (its attention logits w_kᵀxⱼ with w_k = α μ: the embedded Gaussian's
  query-independent factor);
- ``dnl``: the embedded Gaussian's row, DNL's whitened pairwise row
  softmax_j(α x̂ᵢᵀx̂ⱼ), and its unary map softmax_j(α μᵀxⱼ). The embedded Gaussian's row
  is the renormalised product of the other two; DNL adds them instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._backend import Array, to_numpy
from . import Explorer, Layer, explore, image_features

__all__ = ["FAMILIES", "family_layers", "from_family"]

#: The blocks :func:`from_family` shows.
FAMILIES = ("gcnet", "dnl")


def family_layers(caches: dict[str, Any], family: str) -> dict[str, Layer]:
    """The explorer's layers of :func:`nlref.demo.family.family_caches` for ``family``."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    eg = Layer(rows=caches["embedded_gaussian"], label="softmax_j(α xᵢᵀxⱼ): one row per query")
    if family == "gcnet":
        gc = caches["gcnet"]
        return {
            "embedded_gaussian": eg,
            "gcnet": Layer(
                label="GCNet: one map αⱼ = softmax_j(w_kᵀxⱼ + b_k) for every query "
                "(w_k = α μ, the mean feature)",
                maps={"α (every query's map)": (gc.attention[:, 0], "GCNet's one map α")},
            ),
        }
    block = caches["dnl"]
    return {
        "embedded_gaussian": eg,
        "dnl pairwise": Layer(
            rows=np.asarray(to_numpy(block.attention)),
            label="DNL's whitened pairwise term softmax_j(α x̂ᵢᵀx̂ⱼ), x̂ = x − μ",
        ),
        "dnl unary": Layer(
            label="DNL's unary term uⱼ = softmax_j(w_mᵀxⱼ + b_m), the same for every query "
            "(w_m = α μ)",
            maps={"unary u": (block.unary_attention[:, 0], "DNL's unary map u")},
        ),
    }


def from_family(
    image: Array | str | Path,
    family: str = "dnl",
    *,
    size: int = 48,
    sub_sample: int = 1,
    scale: float = 6.0,
    position_weight: float = 0.25,
    title: str | None = None,
    progress: bool | None = False,
) -> Explorer:
    """An explorer of GCNet's or DNL's maps beside the embedded Gaussian's, on an image.

    Parameters
    ----------
    image : array (H, W, 3) or path
    family : {"gcnet", "dnl"}
    size, sub_sample, scale, position_weight, title, progress
        As in :func:`nlref.explore.from_image` (``scale`` is α; DNL's τ is 1).

    Returns
    -------
    Explorer
        Its ``query_dependence`` holds each layer with rows (NaN for the map-only ones).
    """
    from ..demo import family as demo_family

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    image, feats, factor = image_features(image, size, position_weight)
    h, w = feats.spatial
    kernel = None if sub_sample == 1 else (sub_sample, sub_sample)
    caches = demo_family.family_caches(feats.x, scale=scale, sub_sample=kernel)
    names = {"gcnet": "GCNet", "dnl": "the disentangled non-local block"}
    pooled = f", keys pooled {sub_sample}×{sub_sample}" if kernel else ""
    key_spatial: Sequence[int] = caches["embedded_gaussian"].key_shape
    return explore(
        image[: h * factor, : w * factor],
        family_layers(caches, family),
        spatial=(h, w),
        key_spatial=key_spatial,
        kernel=kernel,
        title=title or f"{names[family]} beside the embedded Gaussian ({h}×{w} grid{pooled})",
        progress=progress,
        side_by_side=True,
    )
