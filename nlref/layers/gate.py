r"""The sigmoid gate: each channel of x scaled by σ of one number per sample and channel.

Shapes: x of shape (B, C, N), gate logits t of shape (B, C, 1) (one per channel, shared by
every position), output z of shape (B, C, N). GCNet's ``channel_mul`` fusion, and the
excitation of squeeze-and-excitation networks.

Forward
-------
.. math::

    s_{bc} = \sigma(t_{bc}) = \frac{1}{1 + e^{-t_{bc}}},\qquad z_{bcn} = x_{bcn}\, s_{bc}.

σ is computed from :math:`e^{-|t|}`, which never overflows:
σ(t) = 1 / (1 + e^{−|t|}) for t ≥ 0 and e^{−|t|} / (1 + e^{−|t|}) for t < 0.

Backward
--------
With σ′ = σ(1 − σ), and t shared by the N positions of its channel:

.. math::

    \bar x_{bcn} = \bar z_{bcn}\, s_{bc},\qquad
    \bar t_{bc} = s_{bc}(1 - s_{bc}) \sum_n \bar z_{bcn}\, x_{bcn}.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._backend import Array, namespace

__all__ = ["GateCache", "backward", "forward", "sigmoid"]


@dataclass(frozen=True)
class GateCache:
    """What :func:`backward` needs from :func:`forward`."""

    x: Array  # (B, C, N)
    gate: Array  # s = σ(t), (B, C, 1)


def sigmoid(t: Array) -> Array:
    """σ(t) = 1 / (1 + exp(−t)), elementwise, without overflow for any t."""
    xp = namespace(t)
    e = xp.exp(-xp.abs(t))  # in (0, 1]
    return xp.where(t >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def forward(x: Array, t: Array) -> tuple[Array, GateCache]:
    """Return ``x · σ(t)`` (B, C, N) for x (B, C, N) and t (B, C, 1), and the cache."""
    s = sigmoid(t)
    return x * s, GateCache(x=x, gate=s)


def backward(dz: Array, cache: GateCache) -> tuple[Array, Array]:
    """Return ``(dx, dt)`` for the upstream gradient ``dz`` of shape (B, C, N)."""
    xp = namespace(dz)
    s = cache.gate
    dx = dz * s  # forward was: z = x s
    dt = s * (1.0 - s) * xp.sum(dz * cache.x, axis=-1, keepdims=True)  # s = σ(t)
    return dx, dt
