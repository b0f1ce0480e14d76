"""The layers of the toy models (:mod:`nlref.demo.toy`), beside the Non-local block.

Each is a ``forward(...) -> (out, cache)`` / ``backward(dout, cache)`` pair with its
derivation in the module docstring, like the block's own layers (:mod:`nlref.layers`):

- :mod:`~nlref.demo.layers.conv2d`: a k×k convolution (the local baseline's layer);
- :mod:`~nlref.demo.layers.relu`: the rectifier;
- :mod:`~nlref.demo.layers.global_pool`: global average pooling;
- :mod:`~nlref.demo.layers.linear`: a fully connected layer;
- :mod:`~nlref.demo.layers.cross_entropy`: softmax cross-entropy, the classifier's loss.
"""

from . import conv2d, cross_entropy, global_pool, linear, relu

__all__ = ["conv2d", "cross_entropy", "global_pool", "linear", "relu"]
