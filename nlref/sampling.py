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
from typing import Any

import array_api_compat
import numpy as np

from ._backend import Array, namespace
from .config import NonLocalConfig
from .layers import maxpool, projection
from .pairwise import get as get_pairwise

__all__ = ["draw_smooth_case", "draw_smooth_input", "nonsmooth_margin"]


def nonsmooth_margin(x: Array, params: Mapping[str, Array], cfg: NonLocalConfig) -> float:
    """Distance from (x, params) to the nearest non-differentiable point of the block.

    The smallest of: the gap between the largest and second-largest entry of every
    max-pool window, and |w_θᵀθᵢ + w_φᵀφⱼ| for every pair (concatenation). ``inf`` when the
    block has neither pooling nor ReLU.
    """
    return _smoothness(x, params, cfg)[0]


def _smoothness(x: Array, params: Mapping[str, Array], cfg: NonLocalConfig) -> tuple[float, float]:
    """(nonsmooth margin, smallest per-sample fraction of active concatenation ReLUs)."""
    xp = namespace(x)
    variant = get_pairwise(cfg.pairwise)
    b = x.shape[0]
    kernel = cfg.sub_sample
    margins = [math.inf]
    active = 1.0

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
        pre = a[:, :, None] + bb[:, None, :]
        margins.append(float(xp.min(xp.abs(pre))))
        active = float(xp.min(xp.mean(xp.astype(pre > 0, x.dtype), axis=(1, 2))))
    return min(margins), active


def draw_smooth_input(
    cfg: NonLocalConfig,
    params: Mapping[str, Array],
    shape: tuple[int, ...],
    rng: int | np.random.Generator | None = 0,
    *,
    margin: float = 1e-4,
    min_active: float = 0.1,
    max_tries: int = 500,
) -> Array:
    """Draw x ~ N(0, 1) of ``shape`` whose :func:`nonsmooth_margin` is at least ``margin``.

    For the concatenation variant the draw must also keep at least ``min_active`` of each
    sample's ReLUs active: with a dead ReLU, θ, φ, g, w_f and W_z get exactly zero
    gradients and a gradient check of them would check nothing.

    The array has the library, device and dtype of ``params`` (random numbers come from
    NumPy and are moved with ``xp.asarray``).

    Raises
    ------
    RuntimeError
        If no draw in ``max_tries`` satisfies both (use a smaller input or margin, or other
        parameters).
    """
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    like = next(iter(params.values()))
    xp = namespace(like)
    best, best_active = 0.0, 0.0
    for _ in range(max_tries):
        x = xp.asarray(
            gen.standard_normal(shape), dtype=like.dtype, device=array_api_compat.device(like)
        )
        got, active = _smoothness(x, params, cfg)
        if got >= margin and active >= min_active:
            return x
        best, best_active = max(best, got), max(best_active, active)
    raise RuntimeError(
        f"no input of shape {shape} in {max_tries} draws kept a distance of {margin} from "
        f"every max-pool tie and ReLU kink (best {best:.2e}) with at least {min_active:.0%} of "
        f"the ReLUs active (best {best_active:.0%}); use a smaller shape or margin, or "
        "other parameters"
    )


def draw_smooth_case(
    cfg: NonLocalConfig,
    shape: tuple[int, ...],
    rng: int | np.random.Generator | None = 0,
    *,
    xp: Any = None,
    dtype: str = "float64",
    max_param_draws: int = 20,
    **kwargs: Any,
) -> tuple[dict[str, Array], Array]:
    """Random non-degenerate parameters and a smooth input x for a gradient check.

    Draws ``init_params(cfg, gen, scheme="random", xp=xp, dtype=dtype)`` and then x with
    :func:`draw_smooth_input` (``kwargs`` go there). When no such x exists for those
    parameters (a concatenation ReLU that is nearly dead for every x), the parameters are
    drawn again, up to ``max_param_draws`` times.

    Returns
    -------
    params : dict
    x : array of ``shape``
    """
    from .params import init_params

    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    for attempt in range(max_param_draws):
        params = init_params(cfg, gen, scheme="random", xp=xp, dtype=dtype)
        try:
            return params, draw_smooth_input(cfg, params, shape, gen, **kwargs)
        except RuntimeError:
            if attempt == max_param_draws - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover
