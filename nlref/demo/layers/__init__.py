"""The layers of the toy models (:mod:`nlref.demo.toy`) that the blocks do not use.

Each is a ``forward(...) -> (out, cache)`` / ``backward(dout, cache)`` pair with its
derivation in the module docstring, like the blocks' own layers (:mod:`nlref.layers`,
where the toy models also take ``relu``, ``global_pool`` and ``projection``):

- :mod:`~nlref.demo.layers.conv2d`: a k×k convolution (the local baseline's layer);
- :mod:`~nlref.demo.layers.linear`: a fully connected layer;
- :mod:`~nlref.demo.layers.cross_entropy`: softmax cross-entropy, the classifier's loss.
"""

from . import conv2d, cross_entropy, linear

__all__ = ["conv2d", "cross_entropy", "linear"]
