"""Importers of other frameworks' Non-local weights into nlref's config and parameters.

- :mod:`nlref.interop.torch`: PyTorch modules and checkpoints in the layouts of mmcv
  (``NonLocal1d/2d/3d``), timm (``NonLocalAttn``), pytorchvideo (``NonLocal`` /
  ``create_nonlocal``) and AlexHex7 (``_NonLocalBlockND``). It imports torch when it is
  itself imported; ``import nlref`` and ``import nlref.interop`` never do.

>>> import nlref.interop
>>> nlref.interop.LAYOUTS
('mmcv', 'timm', 'pytorchvideo', 'alexhex7')
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["LAYOUTS", "torch"]

#: The weight layouts :mod:`nlref.interop.torch` reads.
LAYOUTS = ("mmcv", "timm", "pytorchvideo", "alexhex7")


def __getattr__(name: str) -> Any:
    if name == "torch":  # imported on first use, so that torch stays optional
        return importlib.import_module(f"{__name__}.torch")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
