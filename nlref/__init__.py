"""nlref: the reference implementation of the Non-local block (Wang et al., CVPR 2018).

Explicit array formulas for the forward pass and a hand-derived backward pass of every
pairwise variant, running unchanged on any array-API library (NumPy, CuPy,
array-api-strict, PyTorch tensors, JAX arrays), verified by float64 gradient checks and an
independent PyTorch reference. :mod:`nlref.block` is the reference; :mod:`nlref.engine`
runs the same steps in tiles and threads for large problems.

>>> import numpy as np, nlref
>>> cfg = nlref.NonLocalConfig(in_channels=8, pairwise="embedded_gaussian")
>>> params = nlref.init_params(cfg, rng=0)
>>> x = np.random.default_rng(0).standard_normal((2, 8, 4, 4))
>>> z, cache = nlref.forward(x, params, cfg, training=True)
>>> bool(np.all(z == x))   # a fresh block is the identity (BN gamma = 0)
True
>>> cache.attention.shape
(2, 16, 16)
"""

from . import (  # none of these imports torch
    analysis,
    engine,
    family,
    interop,
    layers,
    pairwise,
    presets,
    testing,
    vectors,
)
from ._backend import to_numpy
from .api import backward, forward
from .block import BlockCache
from .config import NonLocalConfig
from .engine import AttentionNotStoredError, MemoryLimitError
from .family import DNLConfig, GCNetConfig  # GCNet and the disentangled non-local block
from .gradcheck import GradcheckError, GradcheckResult, gradcheck, gradcheck_block
from .params import BUFFERS, apply_buffer_updates, init_params, param_shapes, trainable_names
from .presets import preset
from .sampling import draw_smooth_case, draw_smooth_input, nonsmooth_margin

__version__ = "0.2.0"

__all__ = [
    "BUFFERS",
    "AttentionNotStoredError",
    "BlockCache",
    "DNLConfig",
    "GCNetConfig",
    "GradcheckError",
    "GradcheckResult",
    "MemoryLimitError",
    "NonLocalConfig",
    "__version__",
    "analysis",
    "apply_buffer_updates",
    "backward",
    "draw_smooth_case",
    "draw_smooth_input",
    "engine",
    "family",
    "forward",
    "gradcheck",
    "gradcheck_block",
    "init_params",
    "interop",
    "layers",
    "nonsmooth_margin",
    "pairwise",
    "param_shapes",
    "preset",
    "presets",
    "testing",
    "to_numpy",
    "trainable_names",
    "vectors",
]
