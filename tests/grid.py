"""The configuration grid of the block's tests, defined once.

Axes: the registered pairwise variants × 1, 2 or 3 spatial dims × sub-sampling (off, or a
max-pool after or before the projections) × norm (batch norm in training mode, batch norm
in eval mode, none) × biases (all, none) × scale.

Every dimensionality has N = 30 query positions and, pooled, N′ = 4 key positions, and
every pool floors (a remainder that fills no window is dropped). With the same N and N′
the arrays after flattening have the same shapes in 1D, 2D and 3D: a library that
compiles each operation per shape (JAX) compiles them once for all three.

Also here: the case builders (a config, random non-degenerate params, a smooth x and an
upstream gradient), forward + backward of a case, and the comparisons of two runs.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import nlref
from nlref.config import BIAS_LAYERS

B, C, C_INTER = 2, 4, 3
VARIANTS = nlref.pairwise.names()
SOFTMAX_VARIANTS = tuple(v for v in VARIANTS if nlref.pairwise.get(v).softmax)
NOT_SOFTMAX_VARIANTS = tuple(v for v in VARIANTS if not nlref.pairwise.get(v).softmax)

#: spatial shape and max-pool kernel per number of spatial dims
SPATIAL = {1: ((30,), (7,)), 2: ((5, 6), (2, 3)), 3: ((2, 3, 5), (1, 2, 2))}
N, N_KEYS = 30, 4  # query positions, and key positions after pooling, in every dimensionality
#: sub-sampling: (pooled, pool order); the order is irrelevant without pooling
SUB_SAMPLES = {
    "full": (False, "after_projection"),
    "pool_after": (True, "after_projection"),
    "pool_before": (True, "before_projection"),
}
#: norm: (cfg.norm, training)
NORMS = {"bn_train": ("batchnorm", True), "bn_eval": ("batchnorm", False), "no_norm": (None, True)}
NORM_LAYERS = {"bn": "batchnorm", "no_norm": None}  # for tests that sweep training on its own
BIASES = {"bias": BIAS_LAYERS, "nobias": ()}
SCALES = {"unscaled": None, "scale0.5": 0.5}
SCALE = 0.7  # the scale of the cases that do not sweep it, wherever the variant has one
DTYPES = ("float64", "float32")


#: every variant × dims × sub-sampling × norm, as a parametrize mark
EVERY_POINT = pytest.mark.parametrize(
    ("pairwise", "dims", "sub", "norm_id"),
    [
        pytest.param(pairwise, dims, sub, norm_id, id=f"{pairwise}-{dims}d-{sub}-{norm_id}")
        for pairwise in VARIANTS
        for dims in SPATIAL
        for sub in SUB_SAMPLES
        for norm_id in NORMS
    ],
)


def uses_scale(pairwise: str) -> bool:
    return nlref.pairwise.get(pairwise).uses_scale


def shape(dims: int = 2, batch: int = B) -> tuple[int, ...]:
    """x's shape (batch, C, *S) for ``dims`` spatial dims."""
    return (batch, C, *SPATIAL[dims][0])


def n_keys(sub: str) -> int:
    """N′ under the sub-sampling ``sub``."""
    return N_KEYS if SUB_SAMPLES[sub][0] else N


_DEFAULT = object()


def config(
    pairwise: str,
    dims: int = 2,
    sub: str = "full",
    norm: str | None = "batchnorm",
    *,
    scale: Any = _DEFAULT,
    **kwargs: Any,
) -> nlref.NonLocalConfig:
    """The config of a grid point: C → C′ channels, the pool of ``SPATIAL[dims]`` when
    ``sub`` pools, and :data:`SCALE` where the variant has a scale unless ``scale`` is
    given. ``kwargs`` go to :class:`nlref.NonLocalConfig` (``biases``, ...)."""
    pooled, order = SUB_SAMPLES[sub]
    if scale is _DEFAULT:
        scale = SCALE if uses_scale(pairwise) else None
    return nlref.NonLocalConfig(
        in_channels=C,
        inter_channels=C_INTER,
        pairwise=pairwise,
        scale=scale,
        sub_sample=SPATIAL[dims][1] if pooled else None,
        pool_order=order,
        norm=norm,
        **kwargs,
    )


def make_case(
    pairwise: str,
    dims: int = 2,
    sub: str = "full",
    norm: str | None = "batchnorm",
    *,
    batch: int = B,
    spatial: tuple[int, ...] | None = None,
    dtype: str = "float64",
    xp: Any = None,
    **kwargs: Any,
) -> tuple[nlref.NonLocalConfig, Any, Any, dict[str, Any]]:
    """A config, random non-degenerate params, a smooth x (batch, C, \\*S) and an upstream
    dz, on NumPy (``xp`` None) or ``xp`` (the same values).

    ``spatial`` replaces the grid's shape (the pool stays that of its dimensionality); the
    generator is seeded from the arguments; ``kwargs`` go to :func:`config`.
    """
    spatial = SPATIAL[dims][0] if spatial is None else spatial
    cfg = config(pairwise, len(spatial), sub, norm, **kwargs)
    seed = f"{pairwise}-{sub}-{norm}-{batch}-{spatial}"
    rng = np.random.default_rng(zlib.crc32(seed.encode()))
    params, x = nlref.draw_smooth_case(cfg, (batch, C, *spatial), rng=rng, dtype=dtype)
    dz = rng.standard_normal((batch, C, *spatial)).astype(dtype)
    if xp is None:
        return cfg, x, dz, params
    return cfg, xp.asarray(x), xp.asarray(dz), {k: xp.asarray(v) for k, v in params.items()}


@dataclass(frozen=True)
class Case:
    """One point of the full matrix: a config, x's shape and the batch-norm mode."""

    id: str
    cfg: nlref.NonLocalConfig
    shape: tuple[int, ...]
    training: bool

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode())

    def draw(self, xp: Any = None) -> tuple[Any, dict[str, Any], Any]:
        """x, params and dz in float64 on ``xp`` (None: NumPy); the same values on every
        backend."""
        gen = np.random.default_rng(self.seed)
        params, x = nlref.draw_smooth_case(self.cfg, self.shape, rng=gen, xp=xp)
        dz = gen.standard_normal(self.shape)
        return x, params, (dz if xp is None else xp.asarray(dz, dtype=xp.float64))


def matrix(*, scales: dict[str, Any] | None = None, batch: int = B) -> list[Case]:
    """Every variant × dims × sub-sampling × norm × biases (× ``scales``, for the variants
    with a scale: the concatenation refuses one)."""

    def points() -> Iterator[Case]:
        for pairwise in VARIANTS:
            for dims in SPATIAL:
                for sub in SUB_SAMPLES:
                    for norm_id, (norm, training) in NORMS.items():
                        for bias_id, biases in BIASES.items():
                            for scale_id, scale in (scales or {"": None}).items():
                                if scale is not None and not uses_scale(pairwise):
                                    continue
                                parts = [pairwise, f"{dims}d", sub, norm_id, bias_id, scale_id]
                                cfg = config(pairwise, dims, sub, norm, scale=scale, biases=biases)
                                case_id = "-".join(p for p in parts if p)
                                yield Case(case_id, cfg, shape(dims, batch), training)

    return list(points())


# --- forward + backward of a case, and comparisons --------------------------------------


def run(x: Any, dz: Any, params: dict[str, Any], cfg: Any, training: bool, **kw: Any) -> dict:
    """Forward and backward; the outputs as NumPy arrays (z, dx, every gradient, the new BN
    buffers, g), and the cache."""
    z, cache = nlref.forward(x, params, cfg, training=training, **kw)
    dx, grads = nlref.backward(dz, cache)
    out = {"z": z, "dx": dx, **grads, **cache.updated_buffers, "values": cache.values}
    return {"cache": cache, **{k: nlref.to_numpy(v) for k, v in out.items()}}


def assert_path(cache: Any, chunk_size: int | None = None, threads: int = 1) -> None:
    """``cache`` comes from the path asked for (a ``chunk_size`` below N): the reference's
    for one tile and one thread, else the engine's, on ``threads`` threads, in tiles
    exactly when ``chunk_size`` is given."""
    if chunk_size is None and threads == 1:
        assert isinstance(cache, nlref.BlockCache), type(cache).__name__
        return
    assert isinstance(cache, nlref.engine.EngineCache), type(cache).__name__
    assert cache.threads == threads, f"ran on {cache.threads} threads, not {threads}"
    assert cache.plan.materialised == (chunk_size is None), cache.plan


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


def scales(want: dict[str, np.ndarray], gradients: Iterable[str]) -> dict[str, float]:
    """What each output's tolerance is relative to: its largest |entry|; for the
    ``gradients``, the largest entry of them all (a gradient that is 0 by construction is
    rounding noise on both sides)."""
    gradients = set(gradients)
    grad_scale = max(float(np.max(np.abs(want[name]))) for name in gradients)
    return {k: grad_scale if k in gradients else float(np.max(np.abs(v))) for k, v in want.items()}


def assert_identical(a: dict, b: dict, msg: str = "") -> None:
    """The same names, in the same order, with the same dtypes and bits."""
    assert outputs(a) == outputs(b), msg
    for name in outputs(a):
        assert a[name].dtype == b[name].dtype, f"{msg}: {name}"
        np.testing.assert_array_equal(a[name], b[name], err_msg=f"{msg}: {name}")


def host(a: Any) -> np.ndarray:
    """A NumPy copy of any array."""
    return np.array(nlref.to_numpy(a), copy=True)
