"""The tests' independent PyTorch autograd reference: :mod:`nlref.bench.twin`.

The twin is written from the math with stock torch ops and autograd, never from nlref's
functions; ``nlref bench`` times the same code. Here it is used in float64.
"""

from __future__ import annotations

from nlref.bench.twin import embeddings, reference

__all__ = ["torch_block", "torch_embeddings"]

torch_block = reference
torch_embeddings = embeddings
