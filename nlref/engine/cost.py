r"""The cost model of the Non-local block: FLOPs of its matrix products.

Shapes: x (B, C, \*S) with N = prod(S) query positions, N′ key positions after pooling,
C′ inner channels; the pairwise function's inner product runs over :math:`C_f` channels,
C′ for the embedded variants and C for the Gaussian (θ = x, φ = P(x)).

:func:`gemm_flops` counts the multiply-adds of the matrix products (2 FLOPs each) of the
forward and backward passes, as PyTorch runs them too; elementwise work (softmax, batch
norm, max-pool) is not counted. What the pairwise function costs comes from its own
declaration (:attr:`nlref.pairwise.Pairwise.pair_flops`, ``has_logits``), never from its
name. See ``docs/performance.md`` for the table per variant.
"""

from __future__ import annotations

import math

from ..config import NonLocalConfig
from ..pairwise import get as get_pairwise

__all__ = ["gemm_flops"]


def gemm_flops(
    cfg: NonLocalConfig, shape: tuple[int, ...], *, chunked: bool = False
) -> dict[str, int]:
    """FLOPs (2 per multiply-add) of the matrix products of one forward and backward.

    Parameters
    ----------
    cfg : NonLocalConfig
    shape : tuple
        (B, C, \\*S) of x.
    chunked : bool
        Count the recomputation of the logits per tile in the backward (the tiled path),
        for a variant that has logits.

    Returns
    -------
    dict
        ``{"forward": ..., "backward": ..., "recompute": ..., "total": ...}``.
    """
    variant = get_pairwise(cfg.pairwise)
    b, c, *spatial = shape
    n = math.prod(spatial)
    nk = math.prod(cfg.key_shape(spatial))
    ci = cfg.inter_channels
    before = cfg.sub_sample is not None and cfg.pool_order == "before_projection"
    key_positions = nk if before else n  # the key-side projections run on P(x) or on x
    mm = 2 * b  # 2 FLOPs per multiply-add, per batch element

    proj = mm * ci * c * ((n + 2 * key_positions) if variant.embeds else key_positions)
    pair_channels = ci if variant.embeds else c  # the Gaussian compares x itself
    pairwise = b * n * nk * variant.pair_flops(pair_channels)
    aggregate = mm * ci * n * nk  # y = g A^T
    out = mm * c * ci * n  # W_z y
    forward = proj + pairwise + aggregate + out
    # each product has two gradients, each as costly as the product itself
    backward = 2 * forward
    recompute = pairwise if chunked and variant.has_logits else 0
    return {
        "forward": forward,
        "backward": backward,
        "recompute": recompute,
        "total": forward + backward + recompute,
    }
