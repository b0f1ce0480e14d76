"""The Non-local block's two best-known successors, built from its own parts.

- :mod:`nlref.family.gcnet`: GCNet's global context block (Cao et al., 2019). One
  query-independent attention map pools one context vector, which a bottleneck transform
  adds to (or gates) every position. mmcv's ``ContextBlock``, timm's ``GlobalContext``.
- :mod:`nlref.family.dnl`: the disentangled non-local block (Yin et al., ECCV 2020). The
  embedded Gaussian on whitened θ and φ, plus a unary term shared by every query.
  mmsegmentation's ``DisentangledNonLocal2d``.

Each block has the Non-local block's contract: a config (:class:`GCNetConfig`,
:class:`DNLConfig`), :func:`init_params` (each paper's initialisation) and
:func:`param_shapes`, ``forward(x, params, cfg, training=True) -> (z, cache)`` and
``backward(dz, cache) -> (dx, grads)``, with the derivation in the module docstring.

>>> import numpy as np
>>> from nlref import family
>>> cfg = family.GCNetConfig(in_channels=32, fusion=("channel_add",))
>>> params = family.init_params(cfg, rng=0)
>>> x = np.random.default_rng(0).standard_normal((2, 32, 5, 5))
>>> z, cache = family.gcnet.forward(x, params, cfg)
>>> bool(np.all(z == x)), cache.attention.shape   # a fresh channel-add block: the identity
(True, (2, 1, 25))
"""

from . import dnl, gcnet
from .config import FUSIONS, POOLINGS, DNLConfig, GCNetConfig
from .params import init_params, param_shapes, trainable_names

__all__ = [
    "FUSIONS",
    "POOLINGS",
    "DNLConfig",
    "GCNetConfig",
    "dnl",
    "gcnet",
    "init_params",
    "param_shapes",
    "trainable_names",
]
