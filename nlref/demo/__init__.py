"""Demonstrations built on nlref: meaningful attention maps and a trained long-range task.

- :mod:`nlref.demo.photo`: per-pixel features of a real photo (matplotlib's sample image) or
  of a synthetic clip, and the four pairwise variants run on them with hand-set weights.
- :mod:`nlref.demo.toy`: a task that needs long range, a Non-local model and a local
  baseline, trained in pure nlref.
- :mod:`nlref.demo.optim`: SGD with momentum and Adam, written out.

Nothing here needs matplotlib except loading an image file; plotting is :mod:`nlref.viz`.
"""
