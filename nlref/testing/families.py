"""Block families the oracle compares: what :func:`nlref.testing.compare` needs to know.

:func:`~nlref.testing.compare` itself is generic: it deep-copies the module, runs it with
probes on the tensors the layout exposes, collects its output, BN buffers, parameter
gradients and dx, and compares each with nlref's. Everything that depends on the block
comes from a :class:`Family`, named by ``Layout.family``:

- ``read``: the module's config and parameters (through its layout);
- ``reference``: nlref's tensors, keyed by the names of the report's rows, in the order
  the computation produces them;
- ``emulate``: the same in float16 or bfloat16, rounded step by step
  (:mod:`nlref.testing.precision`), or None where the family has no emulation (it is then
  compared in float64 and float32 only);
- ``probes``: the module's intermediate tensors the layout lets the oracle capture;
- ``keys``: nlref parameter and buffer names -> the module's own;
- ``conventions``: what the diagnosis varies when the module does not match
  (:mod:`nlref.testing.diagnosis`);
- ``summary``: the config line of the report.

The Non-local block is :mod:`nlref.testing.nonlocal_block`; GCNet's global context block
and the disentangled non-local block are :mod:`nlref.testing.family_blocks`. Each plugs in
with :func:`register_family`, and layouts name it in ``Layout.family``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["FAMILIES", "Family", "Probe", "get_family", "in_backward_order", "register_family"]


@dataclass(frozen=True)
class Probe:
    """Where to capture one of the module's intermediate tensors.

    Attributes
    ----------
    name : str
        The row it fills (``"g"``, ``"attention"``).
    target : str or None
        A sub-module (its forward output is captured) or a method (wrapped on the oracle's
        copy, its return value captured), by dotted path.
    kwarg : str or None
        A keyword of ``forward`` that makes it return ``(out, tensor)``.
    channels_last : bool
        The captured tensor has its channels last (an ``nn.Linear`` output).
    why_not : str
        Shown when there is neither a target nor a kwarg: why the tensor is not captured.
    """

    name: str
    target: str | None = None
    kwarg: str | None = None
    channels_last: bool = False
    why_not: str = ""


@dataclass(frozen=True)
class Family:
    """One block family: see the module docstring for each callable's role.

    Attributes
    ----------
    name : str
    read : callable
        ``read(module, layout, overrides) -> (cfg, params)``, params as float64 arrays.
    reference : callable
        ``reference(cfg, params, x, dz, training, backward=True) -> {name: array}``: in
        the dtype of x (float64 for the truth, float32 for the float32 estimate). With
        ``backward=False``, only the forward tensors.
    emulate : callable or None
        ``emulate(cfg, params, x, dz, training, fmt) -> {name: array}``; None: the family
        is compared in float64 and float32 only.
    probes : callable
        ``probes(layout, module, cfg) -> list of Probe``.
    keys : callable
        ``keys(layout, cfg) -> {nlref name: module state_dict key}`` for parameters and
        buffers.
    forward_names : tuple of str
        Rows computed by the forward (the others are buffers, gradients, dx).
    buffer_names : tuple of str
        Rows that are buffers updated by a training-mode forward.
    conventions : callable
        ``conventions(cfg, training, x_shape) -> list of diagnosis.Change``.
    summary : callable
        ``summary(cfg) -> str``, the config line of the report.
    terms : callable
        ``terms(cfg, x_shape) -> {name: K}``: how many positions a tensor sums over (a
        parameter gradient sums over the batch and the positions). In float16 and
        bfloat16 the expected error of such a tensor is √K times the emulated one
        (:mod:`nlref.testing.precision`).
    related : callable
        ``related(cfg, training) -> {name: other}``: rows that are zero by construction (a
        bias before a softmax or a whitening) and whose rounding error, in low precision,
        is judged against the magnitude of ``other`` (its layer's weight gradient, a sum
        of the same terms): their own magnitude is only rounding noise.
    """

    name: str
    read: Callable[..., tuple[Any, dict[str, np.ndarray]]]
    reference: Callable[..., dict[str, np.ndarray]]
    emulate: Callable[..., dict[str, np.ndarray]] | None
    probes: Callable[..., list[Probe]]
    keys: Callable[..., Mapping[str, str]]
    forward_names: tuple[str, ...]
    buffer_names: tuple[str, ...]
    conventions: Callable[..., list[Any]]
    summary: Callable[[Any], str]
    terms: Callable[..., Mapping[str, int]] = lambda cfg, x_shape: {}
    related: Callable[..., Mapping[str, str]] = lambda cfg, training: {}

    def stage(self, name: str) -> str:
        """``"forward"``, ``"buffers"`` or ``"backward"`` for the row called ``name``."""
        if name in self.forward_names:
            return "forward"
        return "buffers" if name in self.buffer_names else "backward"


def in_backward_order(grads: Mapping[str, Any], shapes: Mapping[str, Any]) -> dict[str, Any]:
    """``grads`` layer by layer from the output back (weight before bias), for a block whose
    parameters, in the order its forward reaches them, are the keys of ``shapes`` (its
    ``param_shapes(cfg)``)."""
    layers = list(dict.fromkeys(n.rpartition(".")[0] for n in shapes))
    order = {layer: i for i, layer in enumerate(reversed(layers))}

    def key(name: str) -> tuple[int, int]:
        layer, _, kind = name.rpartition(".")
        return order[layer], 0 if kind == "weight" else 1

    return {n: grads[n] for n in sorted(grads, key=key)}


#: The registered families, by name.
FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add ``family`` (layouts name it in ``Layout.family``)."""
    if family.name in FAMILIES and FAMILIES[family.name] is not family:
        raise ValueError(f"a block family named {family.name!r} is already registered")
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    """The family called ``name``.

    Raises
    ------
    ValueError
        If none is registered under that name.
    """
    if name not in FAMILIES:
        from . import family_blocks, nonlocal_block  # noqa: F401  (they register themselves)
    if name not in FAMILIES:
        raise ValueError(f"unknown block family {name!r}; registered: {tuple(FAMILIES)}")
    return FAMILIES[name]
