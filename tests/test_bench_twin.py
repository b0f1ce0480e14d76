"""The PyTorch twin of the block (nlref.bench.twin): the one torch implementation that both
``nlref bench`` times and the tests compare nlref with.

tests/test_matrix.py compares nlref with the twin in float64 over the whole grid (all or no
biases). Here: the twin in float32 (what the benchmark runs) against float64, a subset of
the biases, the memory-frugal concatenation against the materialising one, its inputs left
untouched, and a clear refusal of a variant it has no formula for.
"""

from __future__ import annotations

import numpy as np
import pytest

import nlref
from nlref import cli
from nlref import pairwise as registry

from . import grid
from .conftest import require

CASES = [
    (pairwise, sub, norm_id)
    for pairwise in grid.VARIANTS
    for sub in grid.SUB_SAMPLES
    for norm_id in grid.NORMS
]


def _all(ref: dict) -> dict[str, np.ndarray]:
    out = {k: ref[k] for k in ("z", "attention", "dx")}
    out.update({f"grad {k}": v for k, v in ref["grads"].items()})
    out.update(ref["buffers"])
    return out


@pytest.mark.parametrize(("pairwise", "sub", "norm_id"), CASES)
def test_twin_in_float32_and_float64_with_some_biases(
    pairwise: str, sub: str, norm_id: str
) -> None:
    require("torch")
    from nlref.bench.twin import reference

    norm, training = grid.NORMS[norm_id]
    cfg, x, dz, params = grid.make_case(pairwise, 2, sub, norm, biases=("theta", "g"))
    assert "g.bias" in params and "phi.bias" not in params and "z.bias" not in params
    f64 = reference(x, params, cfg, training=training, dz=dz)
    f32 = reference(x, params, cfg, training=training, dz=dz, dtype="float32")
    want = _all(f64)
    # gradients that are zero by construction (g's bias under a softmax and training batch
    # norm) are rounding noise: compared to the largest magnitude of all outputs
    largest = max(float(np.max(np.abs(v))) for v in want.values())

    # float64 against nlref's hand-derived backward
    z, cache = nlref.forward(x, params, cfg, training=training)
    dx, grads = nlref.backward(dz, cache)
    assert list(grads) == list(f64["grads"])
    ours = {"z": z, "attention": cache.attention, "dx": dx}
    ours.update({f"grad {k}": v for k, v in grads.items()})
    ours.update(cache.updated_buffers if training else f64["buffers"])  # eval: unchanged
    assert set(ours) == set(want)
    for name, value in ours.items():
        np.testing.assert_allclose(
            value, want[name], rtol=1e-10, atol=1e-13 * largest, err_msg=name
        )

    # float32 against float64: rounding only
    for name, value in _all(f32).items():
        assert value.dtype == np.float32, name
        scale = float(np.max(np.abs(want[name])))
        assert float(np.max(np.abs(value - want[name]))) <= 1e-4 * scale + 1e-6 * largest, name


@pytest.mark.parametrize("sub", list(grid.SUB_SAMPLES))
def test_frugal_concatenation_equals_the_materialising_one(sub: str) -> None:
    require("torch")
    from nlref.bench.twin import reference

    cfg, x, dz, params = grid.make_case("concatenation", 3, sub)
    wide = reference(x, params, cfg, training=True, dz=dz, materialise=True)
    frugal = reference(x, params, cfg, training=True, dz=dz, materialise=False)
    want = _all(wide)
    largest = max(float(np.max(np.abs(v))) for v in want.values())
    for name, value in _all(frugal).items():
        np.testing.assert_allclose(
            value, want[name], rtol=1e-12, atol=1e-14 * largest, err_msg=name
        )


def test_block_leaves_its_inputs_alone() -> None:
    torch = require("torch")
    from nlref.bench.twin import block

    cfg, x, _, params = grid.make_case("embedded_gaussian", 2)
    tensors = {k: torch.tensor(v) for k, v in params.items()}
    before = {k: t.clone() for k, t in tensors.items()}
    out = block(torch.tensor(x), tensors, cfg, training=True)
    assert not torch.equal(out.buffers["bn.running_mean"], tensors["bn.running_mean"])
    for name, t in tensors.items():
        assert torch.equal(t, before[name]), name


@pytest.fixture
def throwaway() -> str:
    """A registered variant the twin has no formula for (the dot product under a new name)."""
    import dataclasses

    name = "throwaway_twin_test"
    registry.register(dataclasses.replace(registry.get("dot_product"), name=name, order=99))
    yield name
    registry.unregister(name)


def test_a_variant_without_a_twin_formula_is_refused_clearly(throwaway: str) -> None:
    require("torch")
    from nlref.bench.twin import UnknownVariantError, reference

    cfg, x, dz, params = grid.make_case("dot_product", 1)
    cfg = grid.config(throwaway, 1)
    with pytest.raises(
        UnknownVariantError, match=f"no formula for the pairwise function '{throwaway}'"
    ):
        reference(x, params, cfg, training=True, dz=dz)


def test_bench_refuses_such_a_variant_in_one_line(
    throwaway: str, capsys: pytest.CaptureFixture[str]
) -> None:
    require("torch")
    require("matplotlib")
    code = cli.main(["bench", "--scaling", "--pairwise", throwaway])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1
    assert "nlref.bench.twin.FORMULAS" in captured.err and throwaway in captured.err
