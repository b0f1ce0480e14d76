"""Helpers shared by the oracle tests against real modules (and the tests of the helpers).

``check_report`` is what every real-module test asserts: the module's forward and every
gradient match nlref to 1e-10 in float64, and the comparison is not vacuous (each tensor
that is not zero by construction carries signal, and the concatenation ReLU is neither dead
nor always on).
"""

from __future__ import annotations

from typing import Any

import numpy as np

import nlref

from .conftest import require, require_loaded

TOL = 1e-10  # float64: forward and every gradient


def torch_and_testing() -> tuple[Any, Any]:
    """torch (required) and nlref.testing."""
    torch = require("torch")
    import nlref.testing

    return torch, nlref.testing


def timm_nonlocal_attn() -> type:
    """The real timm NonLocalAttn class (see nlref.testing.load_timm_nonlocal_attn).

    Like ``require``: skipped when timm is missing, a failure when NLREF_REQUIRE names it.
    """
    _, testing = torch_and_testing()
    return require_loaded("timm", testing.load_timm_nonlocal_attn)


def zero_by_construction(cfg: nlref.NonLocalConfig, name: str, training: bool) -> bool:
    """Gradients that are exactly zero whatever the weights (derivations.md, section 8).

    φ's bias under a softmax (adds the same logit to a whole row); g's bias under a softmax
    followed by training-mode BN (rows of A sum to 1, so it shifts every position of W_z y
    by the same vector, which the batch mean removes); z's bias under training-mode BN.
    """
    softmax = nlref.pairwise.get(cfg.pairwise).softmax
    bn_train = cfg.norm is not None and training
    return (
        (name == "phi.bias" and softmax)
        or (name == "g.bias" and softmax and bn_train)
        or (name == "z.bias" and bn_train)
    )


def check_report(report: Any, x: np.ndarray | None = None) -> None:
    """Assert a passing, non-vacuous comparison of a real module with nlref."""
    assert report.ok, str(report)
    assert report.module_error is None
    assert report.rtol == TOL and report.atol == TOL
    for row in report.rows:
        assert row.status == "ok", str(report)
        assert row.max_abs_err <= TOL * max(1.0, row.magnitude), str(report)
        if not zero_by_construction(report.cfg, row.name, report.training):
            assert row.magnitude > 1e-3, f"{row.name} carries no signal\n{report}"
    names = {r.name for r in report.rows}
    assert {"g", "z", "dx"} <= names
    assert set(nlref.trainable_names(report.cfg)) <= names  # every parameter gradient


def concat_active_fraction(module: Any, x: np.ndarray, training: bool) -> float:
    """The fraction of the concatenation's ReLUs that are active for this module and x."""
    from nlref.interop.torch import from_torch

    cfg, params = from_torch(module)
    _, cache = nlref.forward(x, params, cfg, training=training)
    return float(np.mean(nlref.to_numpy(cache.attention) > 0))


def randomize_alive(module: Any, x: np.ndarray, training: bool, seed: int) -> float:
    """Randomise a concatenation module until 10-90 % of its ReLUs are active; the fraction.

    With a (nearly) dead ReLU the attention is 0 and θ, φ, w_f get no gradient: such a
    comparison would check nothing, so the weights are redrawn (seeded, reproducible).
    """
    _, testing = torch_and_testing()
    for attempt in range(50):
        testing.randomize(module, seed + 7919 * attempt)
        frac = concat_active_fraction(module, x, training)
        if 0.1 < frac < 0.9:
            return frac
    raise AssertionError(f"no draw kept the concatenation ReLU alive (last {frac:.0%})")


def test_randomize_is_non_degenerate_and_seeded() -> None:
    torch, testing = torch_and_testing()
    from torch import nn

    def make() -> Any:
        return nn.Sequential(nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3))

    a, b = testing.randomize(make(), 7), testing.randomize(make(), 7)
    c = testing.randomize(make(), 8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    for key in ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
        assert torch.equal(sa[key], sb[key]), key  # same seed, same values
        assert not torch.equal(sa[key], sc[key]), key
        assert float(sa[key].abs().min()) > 0, key
    assert float(sa["1.weight"].min()) >= 0.5  # BN gamma away from 0: no identity block
    assert float(sa["1.running_var"].min()) >= 0.5


def test_zero_by_construction_matches_nlref() -> None:
    # the helper's list is what nlref computes: zero there, non-zero for the dot product
    for pairwise, expect_zero in (("embedded_gaussian", True), ("dot_product", False)):
        cfg = nlref.NonLocalConfig(in_channels=4, inter_channels=3, pairwise=pairwise)
        params = nlref.init_params(cfg, rng=0, scheme="random")
        x = np.random.default_rng(0).standard_normal((2, 4, 5))
        z, cache = nlref.forward(x, params, cfg, training=True)
        _, grads = nlref.backward(np.random.default_rng(1).standard_normal(z.shape), cache)
        for name in ("phi.bias", "g.bias", "z.bias"):
            zero = zero_by_construction(cfg, name, True)
            assert zero == (name == "z.bias" or expect_zero)
            assert (np.max(np.abs(grads[name])) < 1e-12) == zero, name
