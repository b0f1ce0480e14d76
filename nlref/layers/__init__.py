"""The layers of the Non-local block, each a ``forward(...) -> (out, cache)`` /
``backward(dout, cache)`` pair with its derivation in the module docstring.

- :mod:`~nlref.layers.projection`: 1×1 projection ``W x + b``.
- :mod:`~nlref.layers.maxpool`: max-pool subsampling, kernel = stride, floor on odd sizes.
- :mod:`~nlref.layers.batchnorm`: batch norm, training and evaluation.
- :mod:`~nlref.layers.softmax`: numerically stable softmax.
- :mod:`~nlref.layers.bilinear`: scaled pairwise dot products ``α θᵀ φ``.
- :mod:`~nlref.layers.aggregate`: attention-weighted sum ``y = g Aᵀ``.
"""

from . import aggregate, batchnorm, bilinear, maxpool, projection, softmax

__all__ = ["aggregate", "batchnorm", "bilinear", "maxpool", "projection", "softmax"]
