"""``nlref.testing.compare`` / ``assert_matches``: the report, the first divergence, module
errors, and that the user's module is never modified. The modules are AlexHex7
transcriptions (torch only), some with deliberate bugs; the real packages are exercised in
tests/test_oracle_*.py."""

from __future__ import annotations

import importlib
import json
from typing import Any

import numpy as np
import pytest

from .test_oracle_support import check_report, torch_and_testing

SHAPE = (2, 6, 5, 7)


def _lib(name: str) -> Any:
    torch_and_testing()
    return importlib.import_module(f"tests.test_oracle_alexhex7_lib.non_local_{name}")


def _block(name: str = "embedded_gaussian", seed: int = 0, **kwargs: Any) -> Any:
    _, testing = torch_and_testing()
    return testing.randomize(_lib(name).NONLocalBlock2D(6, **kwargs), seed)


def _x(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPE)


def test_compare_passes_and_reports_every_tensor() -> None:
    _, testing = torch_and_testing()
    report = testing.compare(_block(), _x())
    check_report(report)
    names = [r.name for r in report.rows]
    assert names == [
        "g",
        "attention",
        "z",
        "bn.running_mean",
        "bn.running_var",
        "bn.weight",
        "bn.bias",
        "z.weight",
        "z.bias",
        "g.weight",
        "g.bias",
        "phi.weight",
        "phi.bias",
        "theta.weight",
        "theta.bias",
        "dx",
    ]
    assert report.first_divergence is None and report.worst is not None
    text = str(report)
    assert "PASS: 16 tensors match" in text
    assert "W.1.weight.grad" in text and "phi.0.bias.grad" in text and "x.grad" in text
    json.dumps(report.to_dict())  # serialisable
    with pytest.raises(KeyError, match=r"no row 'concat\.weight'"):
        report.row("concat.weight")


def test_the_module_is_not_modified() -> None:
    torch, testing = torch_and_testing()
    module = _block().train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    testing.compare(module, _x())  # training mode: BN statistics change in the copy only
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert module.training and next(module.parameters()).dtype == torch.float32
    assert all(p.grad is None for p in module.parameters())


def test_training_defaults_to_the_modules_mode_and_dz_to_the_seed() -> None:
    torch, testing = torch_and_testing()
    module = _block().eval()
    report = testing.compare(module, torch.tensor(_x(), dtype=torch.float32))
    assert report.training is False
    assert "bn.running_mean" not in [r.name for r in report.rows]  # eval: unchanged
    assert testing.compare(module, _x(), training=True).training is True
    a = testing.compare(module, _x(), seed=1).row("dx").magnitude
    assert a == testing.compare(module, _x(), seed=1).row("dx").magnitude
    assert a != testing.compare(module, _x(), seed=2).row("dx").magnitude
    dz = np.ones(SHAPE)
    assert testing.compare(module, _x(), dz=torch.tensor(dz)).ok
    with pytest.raises(ValueError, match=r"dz must have the shape of z"):
        testing.compare(module, _x(), dz=np.ones((2, 6, 5)))
    with pytest.raises(ValueError, match="channel mismatch"):
        testing.compare(module, np.ones((2, 5, 5, 7)))


def _buggy_forward_class() -> type:
    """The embedded Gaussian with softmax over the wrong axis (a classic bug)."""
    torch, _ = torch_and_testing()
    base = _lib("embedded_gaussian").NONLocalBlock2D

    class WrongAxis(base):
        def forward(self, x: Any, return_nl_map: bool = False) -> Any:
            b = x.size(0)
            g_x = self.g(x).view(b, self.inter_channels, -1).permute(0, 2, 1)
            theta_x = self.theta(x).view(b, self.inter_channels, -1).permute(0, 2, 1)
            phi_x = self.phi(x).view(b, self.inter_channels, -1)
            f = torch.softmax(torch.matmul(theta_x, phi_x), dim=1)  # should be dim=-1
            y = torch.matmul(f, g_x).permute(0, 2, 1).reshape(b, -1, *x.shape[2:])
            z = self.W(y) + x
            return (z, f) if return_nl_map else z

    WrongAxis.__module__ = base.__module__  # the variant is recognised from the file
    return WrongAxis


def test_first_divergence_is_the_attention_for_a_forward_bug() -> None:
    _, testing = torch_and_testing()
    module = testing.randomize(_buggy_forward_class()(6), 0)
    report = testing.compare(module, _x())
    assert not report.ok and report.module_error is None
    assert report.first_divergence == "attention"
    assert report.row("g").ok and not report.row("z").ok
    assert "FAIL: first divergence at attention (forward)" in str(report)
    with pytest.raises(AssertionError, match=r"does not match nlref(.|\n)*attention"):
        testing.assert_matches(module, _x())


def test_first_divergence_for_a_backward_bug() -> None:
    # a custom autograd function with a wrong backward on θ: the forward matches, and the
    # first gradient to differ is θ's weight (dx, computed last, differs too)
    torch, testing = torch_and_testing()
    base = _lib("embedded_gaussian").NONLocalBlock2D

    class BadGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, t: Any) -> Any:
            return t.clone()

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            return 1.001 * grad

    class Bugged(base):
        def forward(self, x: Any, return_nl_map: bool = False) -> Any:
            b = x.size(0)
            g_x = self.g(x).view(b, self.inter_channels, -1).permute(0, 2, 1)
            theta = BadGrad.apply(self.theta(x))
            theta_x = theta.view(b, self.inter_channels, -1).permute(0, 2, 1)
            phi_x = self.phi(x).view(b, self.inter_channels, -1)
            f = torch.softmax(torch.matmul(theta_x, phi_x), dim=-1)
            y = torch.matmul(f, g_x).permute(0, 2, 1).reshape(b, -1, *x.shape[2:])
            z = self.W(y) + x
            return (z, f) if return_nl_map else z

    Bugged.__module__ = base.__module__
    report = testing.compare(testing.randomize(Bugged(6), 0), _x())
    assert [r.name for r in report.rows if not r.ok] == ["theta.weight", "theta.bias", "dx"]
    assert report.first_divergence == "theta.weight"


def test_a_module_that_raises_is_reported_not_fatal() -> None:
    _, testing = torch_and_testing()
    base = _lib("dot_product").NONLocalBlock2D

    class Broken(base):
        def forward(self, x: Any, return_nl_map: bool = False) -> Any:
            raise RuntimeError("CUDA kernel not available")

    Broken.__module__ = base.__module__
    report = testing.compare(testing.randomize(Broken(6), 0), _x())
    assert not report.ok
    assert report.module_error == "RuntimeError: CUDA kernel not available"
    assert report.module_error_stage == "forward"
    assert {r.status for r in report.rows} == {"not captured"}
    assert "FAIL: the module's forward raised" in str(report)


def test_frozen_parameters_are_listed_not_failed() -> None:
    _, testing = torch_and_testing()
    module = _block("concatenation", seed=4)
    module.concat_project[0].weight.requires_grad_(False)
    report = testing.compare(module, _x(4))
    assert report.row("concat.weight").status == "frozen"
    assert report.ok


def test_tolerances_are_validated_and_used() -> None:
    _, testing = torch_and_testing()
    with pytest.raises(ValueError, match="rtol and atol must be > 0"):
        testing.compare(_block(), _x(), rtol=0.0)
    # float64 agreement is ~1e-15: an absurd tolerance of 1e-30 fails, naming the tensor
    report = testing.compare(_block(), _x(), rtol=1e-30, atol=1e-30)
    assert not report.ok and report.first_divergence is not None


def test_make_module_errors() -> None:
    _, testing = torch_and_testing()
    with pytest.raises(ValueError, match="AlexHex7 is not on PyPI"):
        testing.make_module("alexhex7")
    with pytest.raises(ValueError, match="builds"):
        testing.make_module("keras")


def test_vacuous_rows_are_named() -> None:
    # a freshly built AlexHex7 block: BN γ = 0, so every gradient upstream of it is zero
    _, testing = torch_and_testing()
    fresh = _lib("embedded_gaussian").NONLocalBlock2D(6)
    report = testing.compare(fresh, _x())
    assert report.ok
    assert report.vacuous == (
        "z.weight", "z.bias", "g.weight", "g.bias", "phi.weight", "phi.bias", "theta.weight",
        "theta.bias",
    )  # fmt: skip
    assert all(report.row(name).magnitude == 0.0 for name in report.vacuous)
    text = str(report)
    assert "warning: 8 tensors are identically zero in nlref" in text
    assert report.to_dict()["vacuous"] == list(report.vacuous)
    with pytest.raises(AssertionError, match=r"8 tensors are identically zero.*randomize=True"):
        testing.assert_matches(fresh, _x())
    assert testing.assert_matches(fresh, _x(), allow_vacuous=True).ok
    # randomize=True compares a copy with non-degenerate weights, and says so
    report = testing.assert_matches(fresh, _x(), randomize=True, seed=3)
    assert report.vacuous == () and report.randomized
    assert "(layout alexhex7, a randomised copy)" in str(report)
    assert report.notes[0].startswith("compared a randomised copy of the module")
    assert float(fresh.W[1].weight.detach().abs().max()) == 0.0  # the module is untouched
