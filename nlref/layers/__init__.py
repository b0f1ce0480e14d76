"""The layers of the Non-local block, each a ``forward(...) -> (out, cache)`` /
``backward(dout, cache)`` pair with its derivation in the module docstring.

- :mod:`~nlref.layers.projection`: 1×1 projection ``W x + b``.
- :mod:`~nlref.layers.maxpool`: max-pool subsampling, kernel = stride, floor on odd sizes.
- :mod:`~nlref.layers.batchnorm`: batch norm, training and evaluation.
- :mod:`~nlref.layers.softmax`: numerically stable softmax.
- :mod:`~nlref.layers.bilinear`: scaled pairwise dot products ``α θᵀ φ``.
- :mod:`~nlref.layers.aggregate`: attention-weighted sum ``y = g Aᵀ``.

The layers of the Non-local family (:mod:`nlref.family`: GCNet, the disentangled
non-local block):

- :mod:`~nlref.layers.attention_pool`: one softmax over the positions, shared by every
  query, and the weighted sum ``c = Σⱼ softmax(m)ⱼ vⱼ``.
- :mod:`~nlref.layers.layernorm`: layer norm over channels, per position.
- :mod:`~nlref.layers.gate`: the sigmoid gate ``x · σ(t)``, one gate per channel.
- :mod:`~nlref.layers.whiten`: each channel minus its mean over the positions.
- :mod:`~nlref.layers.relu`: the rectifier (GCNet's transform; the toy models).
- :mod:`~nlref.layers.global_pool`: the mean over the positions (GCNet's ``avg`` context;
  the toy models' head).
"""

from . import (
    aggregate,
    attention_pool,
    batchnorm,
    bilinear,
    gate,
    global_pool,
    layernorm,
    maxpool,
    projection,
    relu,
    softmax,
    whiten,
)

__all__ = [
    "aggregate",
    "attention_pool",
    "batchnorm",
    "bilinear",
    "gate",
    "global_pool",
    "layernorm",
    "maxpool",
    "projection",
    "relu",
    "softmax",
    "whiten",
]
