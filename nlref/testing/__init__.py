r"""nlref as a test oracle: check a PyTorch block, or every block of a model, tensor by tensor.

:func:`compare` runs two computations on the same input and upstream gradient:

- the module's own forward and its torch autograd backward, on a deep copy in the chosen
  precision (float64 by default; float32, float16 or bfloat16 with ``dtype=``): the
  module you pass is never modified;
- nlref's forward and hand-derived backward in float64, on the config and weights that
  :func:`nlref.interop.torch.from_torch` reads from the module through its layout (a
  registered name, or a :class:`nlref.interop.torch.Layout` for a block of your own).

It returns a :class:`Report`: one row per tensor (the values g and the attention where the
layout exposes them, z, the updated BN running statistics, every parameter gradient and
dx), each with its error, the first tensor that diverges, the rows that are vacuous
(identically zero in nlref), the module's own exception if its forward or backward
raised, and a diagnosis when the module differs: the conventions (scale, pool order,
kernel, BN mode, a bias, the variant) under which it would match. :func:`assert_matches`
raises an ``AssertionError`` carrying the report's table, for use in a pytest suite::

    import torch, nlref.testing
    from mmcv.cnn import NonLocal2d

    block = nlref.testing.randomize(NonLocal2d(16, mode="dot_product", sub_sample=True))
    nlref.testing.assert_matches(block, torch.randn(2, 16, 9, 7))

The Non-local block's family is checked the same way: mmcv's ``ContextBlock`` and timm's
``GlobalContext`` (GCNet, :mod:`nlref.family.gcnet`) and mmsegmentation's
``DisentangledNonLocal2d`` (:mod:`nlref.family.dnl`) are registered layouts
(``mmcv-gc``, ``timm-gc``, ``dnl``), compared in float64 or float32.

:func:`check_model` finds every recognised block of a model, captures each one's input
during one run of the model, and compares each (:class:`ModelReport`): timm's
``resnet18(block_args=dict(attn_layer="gc"))`` has 8 ``GlobalContext`` blocks. timm's and
mmsegmentation's classes load through :func:`load_timm` and :func:`load_mmseg_dnl` even
where their packages do not import (timm's needs a working torchvision, mmsegmentation's
an mmcv older than 2.2.0 with its compiled ops).

nlref itself never uses autograd: torch computes only the module's side. torch is
imported when a function here is called, not when this package is imported.
"""

from __future__ import annotations

from .model import check_model, find_blocks
from .modules import (
    FAMILY_LAYOUTS,
    MODULE_LAYOUTS,
    load_from_file,
    load_mmseg_dnl,
    load_timm,
    load_timm_nonlocal_attn,
    make_module,
    randomize,
)
from .oracle import assert_matches, compare
from .precision import FACTOR, PRECISIONS
from .report import ModelReport, ModelRow, Report, Row

__all__ = [
    "FACTOR",
    "FAMILY_LAYOUTS",
    "MODULE_LAYOUTS",
    "PRECISIONS",
    "ModelReport",
    "ModelRow",
    "Report",
    "Row",
    "assert_matches",
    "check_model",
    "compare",
    "find_blocks",
    "load_from_file",
    "load_mmseg_dnl",
    "load_timm",
    "load_timm_nonlocal_attn",
    "make_module",
    "randomize",
]
