r"""Two small optimisers written out in full: SGD with momentum, and Adam.

Both are pure functions: they take the parameters, their gradients and the optimiser state
(dicts name -> array) and return *new* parameters and state; nothing is mutated. They work
on any array-API backend, because they only add and multiply arrays.

SGD with momentum (PyTorch's form, ``torch.optim.SGD(momentum=μ)``)
-------------------------------------------------------------------
.. math::

    v_t = \mu\, v_{t-1} + \bar w_t,\qquad w_t = w_{t-1} - \eta\, v_t \qquad (v_0 = 0).

Adam (Kingma & Ba, 2015, with PyTorch's ε placement)
----------------------------------------------------
.. math::

    m_t = \beta_1 m_{t-1} + (1-\beta_1)\,\bar w_t,\qquad
    v_t = \beta_2 v_{t-1} + (1-\beta_2)\,\bar w_t^2,

.. math::

    \hat m_t = \frac{m_t}{1-\beta_1^t},\qquad \hat v_t = \frac{v_t}{1-\beta_2^t},\qquad
    w_t = w_{t-1} - \eta\,\frac{\hat m_t}{\sqrt{\hat v_t} + \varepsilon}.

The bias corrections undo the zero initialisation of m and v: without them the first
steps would be too small by a factor 1 − β₁ᵗ.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .._backend import Array, namespace

__all__ = ["AdamState", "SGDState", "adam_init", "adam_step", "sgd_init", "sgd_step"]


@dataclass(frozen=True)
class SGDState:
    """The momentum buffers v (one per parameter)."""

    velocity: dict[str, Array]


@dataclass(frozen=True)
class AdamState:
    """Adam's step count t and its moment estimates m and v (one per parameter)."""

    step: int
    m: dict[str, Array]
    v: dict[str, Array]


def _check(params: Mapping[str, Array], grads: Mapping[str, Array]) -> None:
    missing = [n for n in params if n not in grads]
    extra = [n for n in grads if n not in params]
    if missing or extra:
        raise ValueError(
            f"grads must have exactly the keys of params; missing {missing}, unexpected {extra}"
        )


def sgd_init(params: Mapping[str, Array]) -> SGDState:
    """Zero momentum buffers for ``params``."""
    return SGDState(velocity={n: namespace(p).zeros_like(p) for n, p in params.items()})


def sgd_step(
    params: Mapping[str, Array],
    grads: Mapping[str, Array],
    state: SGDState,
    *,
    lr: float,
    momentum: float = 0.9,
) -> tuple[dict[str, Array], SGDState]:
    """One step of SGD with momentum; returns the new parameters and state."""
    _check(params, grads)
    velocity = {n: momentum * state.velocity[n] + grads[n] for n in params}
    new = {n: params[n] - lr * velocity[n] for n in params}
    return new, SGDState(velocity=velocity)


def adam_init(params: Mapping[str, Array]) -> AdamState:
    """Step 0 and zero moments for ``params``."""
    zeros = {n: namespace(p).zeros_like(p) for n, p in params.items()}
    return AdamState(step=0, m=zeros, v=dict(zeros))


def adam_step(
    params: Mapping[str, Array],
    grads: Mapping[str, Array],
    state: AdamState,
    *,
    lr: float = 1e-3,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
) -> tuple[dict[str, Array], AdamState]:
    """One Adam step; returns the new parameters and state."""
    _check(params, grads)
    t = state.step + 1
    m = {n: beta1 * state.m[n] + (1 - beta1) * grads[n] for n in params}
    v = {n: beta2 * state.v[n] + (1 - beta2) * grads[n] * grads[n] for n in params}
    c1, c2 = 1 - beta1**t, 1 - beta2**t  # bias corrections
    new = {}
    for n, p in params.items():
        xp = namespace(p)
        new[n] = p - lr * (m[n] / c1) / (xp.sqrt(v[n] / c2) + eps)
    return new, AdamState(step=t, m=m, v=v)
