"""The full test matrix: every configuration, gradient-checked and compared with PyTorch.

Axes: pairwise variant × spatial dims (1D/2D/3D, odd sizes so that max-pool floors) ×
sub-sampling (off, or on with either pool order) × norm (batch norm in training mode,
batch norm in eval mode, none) × biases (all, none) × scale (None, 0.5). The concatenation
variant refuses a scale, which is tested on its own rather than dropped silently.

Each case checks, on every array backend of the ``xp`` fixture:

(a) :func:`nlref.gradcheck_block` on x and every trainable parameter;
(b) z, the attention, dx, every gradient and the updated BN running statistics against an
    independent float64 PyTorch autograd implementation (``torch_reference.py``), to 1e-10.

The torch reference depends only on the case (its inputs are drawn from NumPy with a seed
fixed by the case), so it is computed once and shared between backends.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import nlref

from .torch_reference import torch_block

B, C, C_INTER = 2, 4, 3
RTOL = ATOL = 1e-10

# spatial shape and max-pool kernel per number of spatial dims (odd sizes: floor pooling)
SPATIAL = {1: ((7,), (2,)), 2: ((5, 6), (2, 2)), 3: ((3, 4, 5), (1, 2, 2))}
NORMS = {"bn_train": ("batchnorm", True), "bn_eval": ("batchnorm", False), "no_norm": (None, True)}
BIASES = {"bias": nlref.config.BIAS_LAYERS, "nobias": ()}
SUBSAMPLES = {
    "full": (False, "after_projection"),  # pool order is irrelevant without pooling
    "pool_after": (True, "after_projection"),
    "pool_before": (True, "before_projection"),
}
SCALES = {"unscaled": None, "scale0.5": 0.5}


@dataclass(frozen=True)
class Case:
    id: str
    cfg: nlref.NonLocalConfig
    shape: tuple[int, ...]
    training: bool

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode())


def _uses_scale(pairwise: str) -> bool:
    return nlref.pairwise.get(pairwise).uses_scale


def build_cases() -> list[Case]:
    cases = []
    for pairwise in nlref.pairwise.names():
        for dims, (spatial, kernel) in SPATIAL.items():
            for sub_id, (sub, order) in SUBSAMPLES.items():
                for norm_id, (norm, training) in NORMS.items():
                    for bias_id, biases in BIASES.items():
                        for scale_id, scale in SCALES.items():
                            if scale is not None and not _uses_scale(pairwise):
                                continue  # refused: see test_concatenation_refuses_scale
                            cfg = nlref.NonLocalConfig(
                                in_channels=C,
                                inter_channels=C_INTER,
                                pairwise=pairwise,
                                scale=scale,
                                sub_sample=kernel if sub else None,
                                pool_order=order,
                                norm=norm,
                                biases=biases,
                            )
                            case_id = "-".join(
                                [pairwise, f"{dims}d", sub_id, norm_id, bias_id, scale_id]
                            )
                            cases.append(Case(case_id, cfg, (B, C, *spatial), training))
    return cases


CASES = build_cases()


def draw_case(case: Case, xp: Any) -> tuple[Any, dict[str, Any], Any]:
    """x, params and dz for ``case`` on backend ``xp``; the same values on every backend."""
    gen = np.random.default_rng(case.seed)
    params, x = nlref.draw_smooth_case(case.cfg, case.shape, rng=gen, xp=xp)
    dz = xp.asarray(gen.standard_normal(case.shape), dtype=xp.float64)
    return x, params, dz


_REFERENCE: dict[str, dict[str, Any]] = {}


def torch_result(case: Case, x: Any, params: dict[str, Any], dz: Any) -> dict[str, Any]:
    """The torch reference for ``case``, computed once and shared by the backends."""
    host_x = nlref.to_numpy(x)
    if case.id not in _REFERENCE:
        ref = torch_block(
            host_x,
            {n: nlref.to_numpy(v) for n, v in params.items()},
            case.cfg,
            training=case.training,
            dz=nlref.to_numpy(dz),
        )
        _REFERENCE[case.id] = {"x": host_x.copy(), **ref}
    ref = _REFERENCE[case.id]
    # the sharing is only valid if every backend drew the same input
    np.testing.assert_array_equal(ref["x"], host_x)
    return ref


def compare_with_torch(case: Case, xp: Any) -> dict[str, float]:
    """Run nlref on ``case``, assert agreement with torch; return the max |error| per output."""
    x, params, dz = draw_case(case, xp)
    ref = torch_result(case, x, params, dz)
    z, cache = nlref.forward(x, params, case.cfg, training=case.training)
    dx, grads = nlref.backward(dz, cache)

    got = {"z": z, "attention": cache.attention, "dx": dx}
    want = {"z": ref["z"], "attention": ref["attention"], "dx": ref["dx"]}
    assert list(grads) == list(ref["grads"]) == list(nlref.trainable_names(case.cfg))
    for name in grads:
        got[f"grad {name}"] = grads[name]
        want[f"grad {name}"] = ref["grads"][name]
    assert set(cache.updated_buffers) == (set(ref["buffers"]) if case.training else set())
    for name, value in cache.updated_buffers.items():
        got[name] = value
        want[name] = ref["buffers"][name]

    errors = {}
    for key, value in got.items():
        host = nlref.to_numpy(value)
        assert host.dtype == np.float64, key
        assert host.shape == want[key].shape, key
        np.testing.assert_allclose(host, want[key], rtol=RTOL, atol=ATOL, err_msg=key)
        errors[key] = float(np.max(np.abs(host - want[key]), initial=0.0))
    return errors


def gradcheck_case(case: Case, xp: Any) -> nlref.GradcheckResult:
    x, params, _ = draw_case(case, xp)
    result = nlref.gradcheck_block(case.cfg, x, params, training=case.training, rng=case.seed)
    assert result.ok  # gradcheck_block raises GradcheckError before this on failure
    assert set(result.args) == {"x", *nlref.trainable_names(case.cfg)}
    return result


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_gradcheck(case: Case, xp: Any) -> None:
    gradcheck_case(case, xp)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_torch(case: Case, xp: Any, torch: Any) -> None:
    compare_with_torch(case, xp)


def test_matrix_is_complete() -> None:
    variants = nlref.pairwise.names()
    assert set(variants) == {"gaussian", "embedded_gaussian", "dot_product", "concatenation"}
    per_variant = len(SPATIAL) * len(SUBSAMPLES) * len(NORMS) * len(BIASES)
    expected = sum(per_variant * (len(SCALES) if _uses_scale(v) else 1) for v in variants)
    assert len(CASES) == expected
    assert len({c.id for c in CASES}) == len(CASES)
    # pooling really floors somewhere: an odd size with kernel 2 in every dimensionality
    for spatial, kernel in SPATIAL.values():
        assert any(s % k for s, k in zip(spatial, kernel, strict=True))


@pytest.mark.parametrize("dims", sorted(SPATIAL), ids=lambda d: f"{d}d")
def test_concatenation_refuses_scale(dims: int) -> None:
    assert not _uses_scale("concatenation")
    with pytest.raises(ValueError, match="scale"):
        nlref.NonLocalConfig(
            in_channels=C,
            inter_channels=C_INTER,
            pairwise="concatenation",
            scale=0.5,
            sub_sample=SPATIAL[dims][1],
        )
    cfg = nlref.NonLocalConfig(in_channels=C, inter_channels=C_INTER, pairwise="concatenation")
    assert cfg.scale is None and cfg.effective_scale == 1.0
