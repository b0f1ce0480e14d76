"""nlref against the AlexHex7/Non-local_pytorch layout, which is not on PyPI.

``tests/test_oracle_alexhex7_lib/`` transcribes its four ``lib/non_local_*.py`` files with
their exact sub-module names (so their state_dict keys), pools and forward math, including
``forward(x, return_nl_map=True)``, which exposes the attention. Every variant × 1D/2D/3D
× sub_sample × bn_layer (BN in training and in eval mode, or no BN): forward, attention and
every gradient match nlref to 1e-10. The variant is recognised from the file the class
comes from, as it would be for a checkout of the repository.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import pytest

from .grid import NORMS
from .test_oracle_support import check_report, randomize_alive, torch_and_testing

FILES = {
    "gaussian": "non_local_gaussian",
    "embedded_gaussian": "non_local_embedded_gaussian",
    "dot_product": "non_local_dot_product",
    "concatenation": "non_local_concatenation",
}
SHAPES = {1: (2, 6, 9), 2: (2, 6, 5, 7), 3: (2, 6, 3, 5, 6)}


def _block(pairwise: str, dims: int, sub_sample: bool, norm: str) -> Any:
    torch_and_testing()  # torch is required: the transcription imports it
    lib = importlib.import_module(f"tests.test_oracle_alexhex7_lib.{FILES[pairwise]}")
    cls = {1: lib.NONLocalBlock1D, 2: lib.NONLocalBlock2D, 3: lib.NONLocalBlock3D}[dims]
    norm_layer, training = NORMS[norm]  # the shared grid's BN train / BN eval / no norm
    with_bn = norm_layer is not None
    return cls(6, sub_sample=sub_sample, bn_layer=with_bn).train(training)


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("sub_sample", [True, False], ids=["sub", "full"])
@pytest.mark.parametrize("dims", list(SHAPES), ids=lambda d: f"{d}d")
@pytest.mark.parametrize("pairwise", list(FILES))
def test_alexhex7_matches_nlref(pairwise: str, dims: int, sub_sample: bool, norm: str) -> None:
    _, testing = torch_and_testing()
    seed = 2000 + list(FILES).index(pairwise) * 100 + dims * 10 + sub_sample
    module = _block(pairwise, dims, sub_sample, norm)
    x = np.random.default_rng(seed).standard_normal(SHAPES[dims])
    if pairwise == "concatenation":
        randomize_alive(module, x, NORMS[norm][1], seed)
    else:
        testing.randomize(module, seed)
    report = testing.compare(module, x, seed=seed)
    cfg = report.cfg
    assert cfg.pairwise == pairwise and cfg.scale is None and cfg.inter_channels == 3
    assert cfg.sub_sample == ({1: (2,), 2: (2, 2), 3: (1, 2, 2)}[dims] if sub_sample else None)
    assert cfg.norm == NORMS[norm][0]
    assert report.row("attention").source == "forward(x, return_nl_map=True)[1]"
    check_report(report)


def test_alexhex7_keys_are_the_documented_ones() -> None:
    module = _block("concatenation", 2, True, "bn_train")
    assert set(module.state_dict()) == {
        "g.0.weight",
        "g.0.bias",
        "theta.weight",
        "theta.bias",
        "phi.0.weight",
        "phi.0.bias",
        "W.0.weight",
        "W.0.bias",
        "W.1.weight",
        "W.1.bias",
        "W.1.running_mean",
        "W.1.running_var",
        "W.1.num_batches_tracked",
        "concat_project.0.weight",
    }
    assert set(_block("gaussian", 1, False, "no_norm").state_dict()) == {
        "g.weight",
        "g.bias",
        "W.weight",
        "W.bias",
    }


def test_alexhex7_fresh_block_is_the_identity() -> None:
    # AlexHex7 zeroes BN (or W): nlref reads that and agrees the block is z = x
    torch, testing = torch_and_testing()
    module = _block("embedded_gaussian", 2, True, "bn_eval").double()
    x = np.random.default_rng(0).standard_normal(SHAPES[2])
    assert torch.equal(module(torch.tensor(x)), torch.tensor(x))
    assert testing.compare(module, x).row("z").max_abs_err == 0.0


def test_alexhex7_state_dict_ambiguity() -> None:
    torch_and_testing()
    from nlref.interop.torch import from_state_dict

    module = _block("dot_product", 3, True, "bn_train")
    with pytest.raises(ValueError, match="cannot tell the variant apart"):
        from_state_dict(module.state_dict())
    cfg, _ = from_state_dict(module.state_dict(), pairwise="dot_product")
    assert cfg.sub_sample == (1, 2, 2) and cfg.norm == "batchnorm"
