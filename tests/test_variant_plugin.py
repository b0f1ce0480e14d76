"""Adding a pairwise variant is adding one file.

The test writes a variant nlref has never seen into a file of its own, a learned-gain
cosine similarity with a softmax,

.. math::

    s_{ij} = \\alpha\\,\\kappa\\,\\hat\\theta_i^\\top\\hat\\phi_j,\\qquad
    \\hat\\theta_i = \\theta_i / \\lVert\\theta_i\\rVert,\\quad
    \\hat\\phi_j = \\phi_j / \\lVert\\phi_j\\rVert,\\qquad A = \\operatorname{softmax}_j(s),

with its own parameter κ (``learned_cosine.gain``), its own hand-derived backward, and its
logits step declared (so that the engine runs its softmax in place and recomputes tiles
from row statistics). The file sits in a directory that is added to the package's search
path, exactly as a file in ``nlref/pairwise/`` would be found, and nothing else is
changed. Then:

- ``NonLocalConfig(pairwise=...)``, ``param_shapes`` and ``init_params`` know it;
- ``nlref.forward``/``backward`` run it, and the engine (one tile: bit for bit; tiles and
  threads: to float rounding) computes what the reference computes;
- ``gradcheck_block`` passes on it, reference and engine, and its formula is right;
- the cost model counts its products from its declaration (``pair_flops``,
  ``has_logits``), exactly;
- ``nlref gradcheck`` lists it, accepts it and prints its rows.

It is unregistered afterwards.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from collections.abc import Iterator
from typing import Any

import array_api_compat
import numpy as np
import pytest

import nlref
import nlref.cli
from nlref import engine
from nlref.engine.inplace import RowStats

from . import grid
from .test_engine import CHUNKS, check_against_reference, one_tile_plan
from .test_engine_cost import assert_model_counts_the_products

NAME = "learned_cosine"
GAIN = f"{NAME}.gain"

SOURCE = f'''r"""Learned cosine: f = exp(α κ θ̂ᵢᵀφ̂ⱼ), softmax over j (θ̂ = θ / |θ|, φ̂ = φ / |φ|).

Backward: s̄ → (κ̄, θ̂̄, φ̂̄) by the bilinear form, then through each normalisation
u = v / |v|: v̄ = (ū − u (uᵀū)) / |v|.
"""

from dataclasses import dataclass

from .._backend import Array, namespace
from ..layers import bilinear, softmax
from . import Logits, Pairwise, PairwiseGrads, register

GAIN = "{GAIN}"


@dataclass(frozen=True)
class LogitsCache:
    theta_hat: Array  # (B, C', N), unit columns
    phi_hat: Array  # (B, C', N')
    theta_norm: Array  # (B, 1, N)
    phi_norm: Array  # (B, 1, N')
    cos: Array  # (B, N, N')
    gain: Array  # (1,)
    scale: float
    bilinear: bilinear.BilinearCache


@dataclass(frozen=True)
class Cache:
    logits: LogitsCache
    softmax: softmax.SoftmaxCache


def logits_forward(theta, phi, extra, scale):
    xp = namespace(theta, phi)
    theta_norm = xp.sqrt(xp.sum(theta * theta, axis=1, keepdims=True))
    phi_norm = xp.sqrt(xp.sum(phi * phi, axis=1, keepdims=True))
    theta_hat, phi_hat = theta / theta_norm, phi / phi_norm
    cos, bilinear_cache = bilinear.forward(theta_hat, phi_hat)  # θ̂ᵢᵀφ̂ⱼ
    gain = extra[GAIN]
    s = (scale * gain) * cos
    cache = LogitsCache(theta_hat, phi_hat, theta_norm, phi_norm, cos, gain, scale, bilinear_cache)
    return s, cache


def logits_backward(ds, cache):
    xp = namespace(ds)
    # forward was: s = α κ cos
    dgain = cache.scale * xp.reshape(xp.sum(ds * cache.cos), (1,))
    dtheta_hat, dphi_hat = bilinear.backward((cache.scale * cache.gain) * ds, cache.bilinear)
    # forward was: u = v / |v|
    theta_hat, phi_hat = cache.theta_hat, cache.phi_hat
    dtheta = dtheta_hat - theta_hat * xp.sum(theta_hat * dtheta_hat, axis=1, keepdims=True)
    dphi = dphi_hat - phi_hat * xp.sum(phi_hat * dphi_hat, axis=1, keepdims=True)
    return PairwiseGrads(
        dtheta=dtheta / cache.theta_norm, dphi=dphi / cache.phi_norm, dextra={{GAIN: dgain}}
    )


def forward(theta, phi, extra, scale):
    s, logits_cache = logits_forward(theta, phi, extra, scale)
    attention, softmax_cache = softmax.forward(s)
    return attention, Cache(logits=logits_cache, softmax=softmax_cache)


def backward(dattention, cache):
    ds = softmax.backward(dattention, cache.softmax)  # forward was: A = softmax(s)
    return logits_backward(ds, cache.logits)


VARIANT = register(
    Pairwise(
        name="{NAME}",
        formula="f = exp(α κ cos(θᵢ, φⱼ)), C(x) = Σⱼ f  (softmax)",
        order=99,
        embeds=True,
        uses_scale=True,
        forward=forward,
        backward=backward,
        has_logits=True,
        pair_flops=lambda channels: 2 * channels,  # θ̂ᵢᵀφ̂ⱼ
        softmax=True,
        logits=Logits(forward=logits_forward, backward=logits_backward),
        extra_params=lambda inter_channels: {{GAIN: (1,)}},
    )
)
'''


@pytest.fixture
def variant(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[nlref.pairwise.Pairwise]:
    """The variant's file, found on the package's path and imported as its module."""
    (tmp_path / f"{NAME}.py").write_text(SOURCE, encoding="utf-8")
    monkeypatch.setattr(nlref.pairwise, "__path__", [*nlref.pairwise.__path__, str(tmp_path)])
    assert NAME not in nlref.pairwise.names()
    # what the package's discovery loop iterates over now holds the file
    assert NAME in {m.name for m in pkgutil.iter_modules(nlref.pairwise.__path__)}
    module = importlib.import_module(f"nlref.pairwise.{NAME}")
    try:
        yield module.VARIANT
    finally:
        nlref.pairwise.unregister(NAME)
        sys.modules.pop(f"nlref.pairwise.{NAME}", None)
        if hasattr(nlref.pairwise, NAME):
            delattr(nlref.pairwise, NAME)


def make_case(sub: str = "pool_after", norm: str | None = "batchnorm", **kw: Any) -> Any:
    """A grid case of the variant, with a gain that makes the softmax far from uniform."""
    cfg, x, dz, params = grid.make_case(NAME, 2, sub, norm, **kw)
    params[GAIN] = params[GAIN] * 0.0 + 2.5
    return cfg, x, dz, params


def test_registered_and_configurable(variant: Any) -> None:
    assert nlref.pairwise.names()[-1] == NAME
    assert nlref.pairwise.get(NAME) is variant
    cfg = nlref.NonLocalConfig(in_channels=8, pairwise=NAME, scale=0.5, sub_sample=(2, 2))
    assert cfg.effective_scale == 0.5
    assert nlref.param_shapes(cfg)[GAIN] == (1,)
    assert GAIN in nlref.trainable_names(cfg)
    assert set(nlref.init_params(cfg, rng=0)) == set(nlref.param_shapes(cfg))


def test_unregistered_afterwards() -> None:
    """(Runs after the tests above: the fixture took the variant away again.)"""
    assert NAME not in nlref.pairwise.names()
    with pytest.raises(ValueError, match="unknown pairwise function"):
        nlref.NonLocalConfig(in_channels=8, pairwise=NAME)


def test_the_formula(variant: Any) -> None:
    """The attention is softmax_j(α κ cos(θᵢ, φⱼ)), computed here directly."""
    cfg, x, _, params = make_case("full", None)
    _, cache = nlref.forward(x, params, cfg)
    theta = np.einsum("oc,bcn->bon", params["theta.weight"], x.reshape(grid.B, grid.C, -1))
    theta = theta + params["theta.bias"][:, None]
    phi = np.einsum("oc,bcn->bon", params["phi.weight"], x.reshape(grid.B, grid.C, -1))
    phi = phi + params["phi.bias"][:, None]
    cos = np.einsum("bci,bcj->bij", theta, phi)
    cos /= np.linalg.norm(theta, axis=1)[:, :, None] * np.linalg.norm(phi, axis=1)[:, None, :]
    s = cfg.effective_scale * 2.5 * cos
    expected = np.exp(s - s.max(axis=-1, keepdims=True))
    expected /= expected.sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(cache.attention, expected, rtol=1e-12, atol=1e-15)
    assert np.max(expected) > 2 / grid.N  # far from uniform


def test_variant_alone_gradcheck(variant: Any) -> None:
    rng = np.random.default_rng(6)
    inputs = {
        "theta": rng.standard_normal((2, 3, 5)),
        "phi": rng.standard_normal((2, 3, 4)),
        GAIN: np.array([1.7]),
    }

    def fwd(inp: dict[str, Any]) -> Any:
        return variant.forward(inp["theta"], inp["phi"], {GAIN: inp[GAIN]}, 0.8)

    def bwd(d: Any, cache: Any) -> dict[str, Any]:
        grads = variant.backward(d, cache)
        return {"theta": grads.dtheta, "phi": grads.dphi, **grads.dextra}

    result = nlref.gradcheck(fwd, bwd, inputs, mode="elementwise")
    assert result.ok, str(result)


@pytest.mark.parametrize("sub", list(grid.SUB_SAMPLES))
def test_gradcheck_block(variant: Any, sub: str) -> None:
    cfg, x, _, params = make_case(sub)
    result = nlref.gradcheck_block(cfg, x, params, rng=3)
    assert result.ok, str(result)
    assert GAIN in result.args
    tiled = nlref.gradcheck_block(cfg, x, params, rng=3, chunk_size=4, threads=2)
    assert tiled.ok, str(tiled)


@pytest.mark.parametrize("norm_id", list(grid.NORMS))
def test_engine_is_the_reference(variant: Any, norm_id: str, xp: Any) -> None:
    """One tile and one thread: bit for bit; every chunk size and thread split: to float
    rounding (NumPy and array-api-strict; the softmax in place where the engine may)."""
    norm, training = grid.NORMS[norm_id]
    cfg, x, dz, params = make_case("pool_before", norm, xp=xp)
    z_ref, ref = nlref.forward(x, params, cfg, training=training)
    z, cache = engine.forward(x, params, cfg, training, one_tile_plan(x, cfg))
    assert isinstance(cache.runs[0].attention.tiles[0].state[1], RowStats)
    dx_ref, grads_ref = nlref.backward(dz, ref)
    dx, grads = nlref.backward(dz, cache)
    assert list(grads) == list(grads_ref) and grads[GAIN].shape == (1,)
    for got, want in [(z, z_ref), (dx, dx_ref), (cache.attention, ref.attention)]:
        assert np.array_equal(grid.host(got), grid.host(want))
    for name in grads:
        assert np.array_equal(grid.host(grads[name]), grid.host(grads_ref[name])), name
    if array_api_compat.is_cupy_namespace(xp):
        return  # CuPy arrays run on one thread
    for batch, threads in [(3, 1), (3, 2), (2, 3)]:
        cfg, x, dz, params = make_case("pool_before", norm, batch=batch, xp=xp)
        check_against_reference(cfg, x, dz, params, training, batch, threads, CHUNKS)


@pytest.mark.parametrize("chunk_size", [None, 4], ids=["reference", "tiled"])
def test_cost_model_counts_its_products(
    variant: Any, chunk_size: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, x, _, params = make_case("pool_after")
    model = assert_model_counts_the_products(cfg, x, params, monkeypatch, chunk_size=chunk_size)
    assert (model["recompute"] > 0) == (chunk_size is not None)


def test_command_line_lists_and_checks_it(variant: Any, capsys: pytest.CaptureFixture) -> None:
    assert nlref.cli.main(["gradcheck", "--help"]) == 0
    assert NAME in capsys.readouterr().out
    assert nlref.cli.main(["gradcheck", "--pairwise", NAME, "--dims", "2"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(NAME)]
    assert len(rows) == 3 and all(line.split()[-1] == "ok" for line in rows), out
    assert GAIN in out  # its own parameter has a column
    assert "PASS" in out.splitlines()[-1]
