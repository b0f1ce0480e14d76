"""Drawing test inputs away from the block's non-differentiable points.

Max-pool is not differentiable where two entries of a window tie for the maximum, and the
concatenation variant's ReLU is not differentiable where wᵀ[θᵢ; φⱼ] = 0. Near such points
a finite difference straddles the kink and disagrees with any (sub)gradient, so a correct
backward would fail a gradient check. :func:`nonsmooth_margin` measures how far an input is
from every kink; :func:`draw_smooth_input` redraws until that distance is comfortable.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import array_api_compat
import numpy as np

from ._backend import Array, namespace
from .config import NonLocalConfig
from .layers import maxpool, projection
from .pairwise import get as get_pairwise

__all__ = ["draw_smooth_input", "nonsmooth_margin"]


def nonsmooth_margin(x: Array, params: Mapping[str, Array], cfg: NonLocalConfig) -> float:
    """Distance from (x, params) to the nearest non-differentiable point of the block.

    The smallest of: the gap between the largest and second-largest entry of every
    max-pool window, and |w_θᵀθᵢ + w_φᵀφⱼ| for every pair (concatenation). ``inf`` when the
    block has neither pooling nor ReLU.
    """
    xp = namespace(x)
    variant = get_pairwise(cfg.pairwise)
    b = x.shape[0]
    kernel = cfg.sub_sample
    margins = [math.inf]

    def project(layer: str, inp: Array) -> Array:
        flat = xp.reshape(inp, (inp.shape[0], inp.shape[1], -1))
        out, _ = projection.forward(flat, params[f"{layer}.weight"], params.get(f"{layer}.bias"))
        return xp.reshape(out, (inp.shape[0], out.shape[1], *inp.shape[2:]))

    def window_gap(u: Array) -> None:
        if kernel is None or math.prod(kernel) == 1:
            return
        top = xp.sort(maxpool.windows(u, kernel), axis=-1)
        margins.append(float(xp.min(top[..., -1] - top[..., -2])))

    def pooled(u: Array) -> Array:
        return u if kernel is None else maxpool.forward(u, kernel)[0]

    before = cfg.pool_order == "before_projection"
    if kernel is not None and (before or not variant.embeds):
        window_gap(x)
    if variant.embeds and not before:
        window_gap(project("phi", x))
    if not before:
        window_gap(project("g", x))

    if "concat.weight" in params:  # the concatenation ReLU
        w = params["concat.weight"]
        ci = cfg.inter_channels
        theta = xp.reshape(project("theta", x), (b, ci, -1))
        phi = project("phi", pooled(x)) if before else pooled(project("phi", x))
        phi = xp.reshape(phi, (b, ci, -1))
        a = xp.matmul(w[:ci], theta)  # (B, N)
        bb = xp.matmul(w[ci:], phi)  # (B, N')
        margins.append(float(xp.min(xp.abs(a[:, :, None] + bb[:, None, :]))))
    return min(margins)


def draw_smooth_input(
    cfg: NonLocalConfig,
    params: Mapping[str, Array],
    shape: tuple[int, ...],
    rng: int | np.random.Generator | None = 0,
    *,
    margin: float = 1e-4,
    max_tries: int = 500,
) -> Array:
    """Draw x ~ N(0, 1) of ``shape`` whose :func:`nonsmooth_margin` is at least ``margin``.

    The array has the library, device and dtype of ``params`` (random numbers come from
    NumPy and are moved with ``xp.asarray``).

    Raises
    ------
    RuntimeError
        If no draw in ``max_tries`` reaches the margin (use a smaller input or margin).
    """
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    like = next(iter(params.values()))
    xp = namespace(like)
    best = 0.0
    for _ in range(max_tries):
        x = xp.asarray(
            gen.standard_normal(shape), dtype=like.dtype, device=array_api_compat.device(like)
        )
        got = nonsmooth_margin(x, params, cfg)
        if got >= margin:
            return x
        best = max(best, got)
    raise RuntimeError(
        f"no input of shape {shape} in {max_tries} draws kept a distance of {margin} from "
        f"every max-pool tie and ReLU kink (best {best:.2e}); use a smaller shape or margin"
    )
