"""Importers of other frameworks' Non-local weights into nlref's config and parameters.

- :mod:`nlref.interop.layouts`: :class:`Layout`, where a PyTorch module keeps each part of
  a block, and the table of registered layouts (:data:`LAYOUTS`): mmcv
  (``NonLocal1d/2d/3d``), timm (``NonLocalAttn``), pytorchvideo (``NonLocal`` /
  ``create_nonlocal``), AlexHex7 (``_NonLocalBlockND``); GCNet's ``ContextBlock`` (mmcv,
  ``mmcv-gc``) and ``GlobalContext`` (timm, ``timm-gc``); mmsegmentation's
  ``DisentangledNonLocal2d`` (``dnl``, with :func:`mmseg_scale`, its float32 scale); and
  any added with :func:`register_layout`. It does not import torch.
- :mod:`nlref.interop.torch`: PyTorch modules and checkpoints in those layouts. It imports
  torch when it is itself imported; ``import nlref`` and ``import nlref.interop`` never do.
- :mod:`nlref.interop.onnx`: a block as an ONNX graph of standard operators (needs the
  ``onnx`` package).

>>> import nlref.interop
>>> tuple(nlref.interop.LAYOUTS)
('mmcv', 'timm', 'pytorchvideo', 'alexhex7', 'mmcv-gc', 'timm-gc', 'dnl')
"""

from __future__ import annotations

import importlib
from typing import Any

from .layouts import (
    LAYOUTS,
    Layout,
    get_layout,
    layout_names,
    mmseg_scale,
    register_layout,
    unregister_layout,
)

__all__ = [
    "LAYOUTS",
    "Layout",
    "get_layout",
    "layout_names",
    "mmseg_scale",
    "onnx",
    "register_layout",
    "torch",
    "unregister_layout",
]


def __getattr__(name: str) -> Any:
    if name in ("torch", "onnx"):  # imported on first use, so that torch / onnx stay optional
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
