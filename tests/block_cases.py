"""Small Non-local block cases shared by the tests of the evaluation paths
(tests/test_chunked.py, tests/test_parallel.py): a config with random non-degenerate
params, a smooth input, an upstream gradient; forward + backward; and the comparison."""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

import nlref

C, C_INTER = 4, 3


def make_case(
    pairwise: str,
    batch: int,
    spatial: tuple[int, ...],
    kernel: tuple[int, ...] | None,
    order: str,
    norm: str | None,
    *,
    seed: str,
    dtype: str = "float64",
    xp: Any = None,
) -> tuple[nlref.NonLocalConfig, Any, Any, dict[str, Any]]:
    """Random non-degenerate params, a smooth x (batch, C, *spatial) and an upstream dz.

    ``kernel`` None: no pooling. ``seed`` names the case (its CRC seeds the generator).
    """
    scale = 0.7 if nlref.pairwise.get(pairwise).uses_scale else None
    cfg = nlref.NonLocalConfig(
        in_channels=C,
        inter_channels=C_INTER,
        pairwise=pairwise,
        scale=scale,
        sub_sample=kernel,
        pool_order=order,
        norm=norm,
    )
    rng = np.random.default_rng(zlib.crc32(seed.encode()))
    params = nlref.init_params(cfg, rng=rng, scheme="random", dtype=dtype, xp=xp)
    x = nlref.draw_smooth_input(cfg, params, (batch, C, *spatial), rng=rng)
    dz = rng.standard_normal((batch, C, *spatial))
    if xp is None:
        return cfg, np.asarray(x, dtype=dtype), dz.astype(dtype), params
    x = xp.asarray(nlref.to_numpy(x), dtype=getattr(xp, dtype))
    return cfg, x, xp.asarray(dz, dtype=getattr(xp, dtype)), params


def run(x: Any, dz: Any, params: dict[str, Any], cfg: Any, training: bool, **kw: Any) -> dict:
    """Forward and backward; the outputs as NumPy arrays (z, dx, every gradient, the new BN
    buffers, g), and the cache."""
    z, cache = nlref.forward(x, params, cfg, training=training, **kw)
    dx, grads = nlref.backward(dz, cache)
    out = {"z": z, "dx": dx, **grads, **cache.updated_buffers, "values": cache.values}
    return {"cache": cache, **{k: nlref.to_numpy(v) for k, v in out.items()}}


def outputs(result: dict) -> list[str]:
    return [name for name in result if name != "cache"]


def assert_same(a: dict, b: dict, rtol: float, atol: float, msg: str = "") -> None:
    """Equal to ``rtol``; ``atol`` is relative to the largest magnitude of all outputs, for
    the gradients that are zero by construction (rounding noise on both paths)."""
    assert outputs(a) == outputs(b), msg
    scale = max(float(np.max(np.abs(b[n]))) for n in outputs(b))
    for name in outputs(a):
        np.testing.assert_allclose(
            a[name], b[name], rtol=rtol, atol=atol * scale, err_msg=f"{msg}: {name}"
        )
