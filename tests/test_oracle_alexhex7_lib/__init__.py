"""A transcription of AlexHex7/Non-local_pytorch's ``lib/`` (not on PyPI), for the oracle tests.

One file per variant, named as in that repository (``non_local_gaussian.py``,
``non_local_embedded_gaussian.py``, ``non_local_dot_product.py``,
``non_local_concatenation.py``), each with a ``_NonLocalBlockND`` class and its
``NONLocalBlock1D/2D/3D`` subclasses. They keep AlexHex7's constructor, sub-module names
(and so its state_dict keys), pools, initialisation and forward math, including
``forward(x, return_nl_map=False)``. Written for these tests from the repository's
description; the shared constructor lives in ``_base.py``.

One deliberate difference: upstream's ``non_local_gaussian.py`` (commit 0276c7b) reads
``self.store_last_batch_nl_map`` in ``forward`` without ever setting it in ``__init__``,
so its forward raises ``AttributeError``; the transcription leaves that line out.
"""
