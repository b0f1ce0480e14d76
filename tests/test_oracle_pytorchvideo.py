"""nlref against the real pytorchvideo 0.1.5 ``create_nonlocal`` (SlowFast's math).

softmax and dot_product × pool sizes (none, (1, 2, 2), (2, 2, 2), (1, 3, 2)) × norm (none,
BN in training mode, BN in eval mode), randomised weights, odd sizes: the output, the
values g, the BN running statistics, every gradient and dx match nlref to 1e-10. The pool
runs on x before the φ and g projections, which is nlref's ``pool_order="before_projection"``;
the other order is caught at g, the first tensor it changes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from .conftest import require
from .grid import NORMS
from .test_oracle_support import check_report, torch_and_testing

INSTANTIATIONS = {"softmax": "embedded_gaussian", "dot_product": "dot_product"}
POOLS = {"nopool": (1, 1, 1), "pool122": (1, 2, 2), "pool222": (2, 2, 2), "pool132": (1, 3, 2)}
SHAPE = (2, 6, 4, 7, 5)  # odd: the pools floor


def _create(instantiation: str, pool: tuple[int, ...], norm: str, seed: int) -> Any:
    torch, testing = torch_and_testing()
    require("pytorchvideo")
    from pytorchvideo.layers.nonlocal_net import create_nonlocal

    norm_layer, training = NORMS[norm]  # the shared grid's BN train / BN eval / no norm
    with_bn = norm_layer is not None
    module = create_nonlocal(
        dim_in=6,
        dim_inner=4,
        pool_size=pool,
        instantiation=instantiation,
        norm=torch.nn.BatchNorm3d if with_bn else None,
    )
    return testing.randomize(module, seed).train(training)


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("pool", list(POOLS))
@pytest.mark.parametrize("instantiation", list(INSTANTIATIONS))
def test_pytorchvideo_matches_nlref(instantiation: str, pool: str, norm: str) -> None:
    _, testing = torch_and_testing()
    seed = 1000 + list(POOLS).index(pool) * 10 + list(NORMS).index(norm)
    module = _create(instantiation, POOLS[pool], norm, seed)
    x = np.random.default_rng(seed).standard_normal(SHAPE)
    report = testing.compare(module, x, seed=seed)
    cfg = report.cfg
    assert cfg.pairwise == INSTANTIATIONS[instantiation]
    assert cfg.pool_order == "before_projection"
    assert cfg.sub_sample == (None if pool == "nopool" else POOLS[pool])
    assert cfg.scale == (4**-0.5 if instantiation == "softmax" else None)
    check_report(report)


def test_pytorchvideo_pool_order_matters() -> None:
    # reading pytorchvideo with the paper's pool order is a different block: caught at g
    _, testing = torch_and_testing()
    module = _create("softmax", (1, 2, 2), "bn_eval", 5)
    x = np.random.default_rng(5).standard_normal(SHAPE)
    report = testing.compare(module, x, pool_order="after_projection")
    assert not report.ok and report.first_divergence == "g"


def test_pytorchvideo_state_dict_needs_the_pool_and_the_variant() -> None:
    # the pool and the instantiation are not in the weights: from_state_dict asks for them
    torch_and_testing()
    from nlref.interop.torch import from_state_dict, from_torch

    module = _create("dot_product", (1, 2, 2), "bn_eval", 6)
    cfg, params = from_torch(module)
    with pytest.raises(ValueError, match="pass pairwise="):
        from_state_dict(module.state_dict())
    cfg2, params2 = from_state_dict(
        module.state_dict(), "pytorchvideo", pairwise="dot_product", sub_sample=True
    )
    assert cfg2 == cfg
    assert all(np.array_equal(params[k], params2[k]) for k in params)
