r"""Softmax cross-entropy, averaged over the batch: the loss of a classifier.

Shapes: logits s of shape (B, K) for K classes, integer labels y of shape (B,) in
[0, K), loss L a scalar (a 0-d array).

Forward
-------
With the row max :math:`m_b = \max_k s_{b,k}` subtracted for stability (it cancels),

.. math::

    \log p_{b,k} = s_{b,k} - m_b - \log\sum_{k'} e^{s_{b,k'} - m_b},\qquad
    L = -\frac1B \sum_b \log p_{b,y_b}.

Backward
--------
Writing :math:`e_{y_b}` for the one-hot vector of the label,
:math:`\partial(-\log p_{b,y_b})/\partial s_{b,k} = p_{b,k} - [k = y_b]`, so for the
upstream gradient :math:`\bar L` (a scalar, 1 when L is the final loss)

.. math::

    \bar s = \frac{\bar L}{B}\,(p - e_{y}).

The labels are integers: they have no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import array_api_compat

from ..._backend import Array, namespace

__all__ = ["CrossEntropyCache", "backward", "forward"]


@dataclass(frozen=True)
class CrossEntropyCache:
    """What :func:`backward` needs from :func:`forward`."""

    probs: Array  # (B, K), softmax of the logits
    onehot: Array  # (B, K), one-hot labels in the logits' dtype


def forward(logits: Array, labels: Array) -> tuple[Array, CrossEntropyCache]:
    """Mean cross-entropy of ``logits`` (B, K) against integer ``labels`` (B,).

    Returns
    -------
    loss : 0-d array
    cache : CrossEntropyCache

    Raises
    ------
    ValueError
        On mismatched shapes or labels outside [0, K).
    TypeError
        If the labels are not integers.
    """
    xp = namespace(logits, labels)
    if len(logits.shape) != 2 or tuple(labels.shape) != (logits.shape[0],):
        raise ValueError(
            "expected logits of shape (B, K) and labels of shape (B,), "
            f"got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    if not xp.isdtype(labels.dtype, "integral"):
        raise TypeError(f"labels must be integers (class indices), got dtype {labels.dtype}")
    k = logits.shape[1]
    if bool(xp.any(labels < 0)) or bool(xp.any(labels >= k)):
        raise ValueError(f"labels must lie in [0, K) = [0, {k}), got values outside")
    shifted = logits - xp.max(logits, axis=1, keepdims=True)
    log_probs = shifted - xp.log(xp.sum(xp.exp(shifted), axis=1, keepdims=True))
    classes = xp.arange(k, dtype=labels.dtype, device=array_api_compat.device(labels))
    onehot = xp.astype(labels[:, None] == classes[None, :], logits.dtype)  # (B, K)
    loss = -xp.sum(onehot * log_probs) / logits.shape[0]
    return loss, CrossEntropyCache(probs=xp.exp(log_probs), onehot=onehot)


def backward(dloss: Array | float, cache: CrossEntropyCache) -> Array:
    """Gradient with respect to the logits, (B, K), for the upstream gradient ``dloss``."""
    # forward was: L = -mean_b log p[b, y_b]
    return dloss * (cache.probs - cache.onehot) / cache.probs.shape[0]
