"""Why a module differs: the conventions that, changed in nlref, make the module match.

Public implementations of one block disagree on a handful of conventions (for the
Non-local block: the logit scale, the pool order and kernel, BN's mode, each bias, the
embedded Gaussian vs the dot product, the concatenation's 1/N′). When a comparison fails,
:func:`search` reruns nlref with each of them changed, then with every pair of them
changed, and keeps the changes under which every tensor the module computed matches
nlref within the comparison's own tolerances. It is cheap: a comparison's inputs are
small, and each try is one forward and backward of nlref.

A :class:`Change` is generic: ``apply`` maps nlref's :class:`State` (config, parameters,
BN mode, and adjustments of the expected tensors) to a changed one, or to None where it
does not apply, and ``describe`` says, in words, what the module behaves as. The block
family lists its changes (``Family.conventions``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

__all__ = ["Change", "Context", "State", "explain", "search"]


@dataclass(frozen=True)
class State:
    """What nlref computes with: config, parameters, BN mode, and adjustments of its
    tensors (``adjust``: functions ``{name: array} -> {name: array}``, e.g. a gradient the
    module cannot have)."""

    cfg: Any
    params: Mapping[str, np.ndarray]
    training: bool
    adjust: tuple[Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], ...] = ()

    def with_(self, **changes: Any) -> State:
        """A copy with ``changes``."""
        return replace(self, **changes)


@dataclass(frozen=True)
class Context:
    """What a change may look at: the module's tensors and a way to run nlref.

    ``got`` holds the module's tensors that were compared, ``bounds`` a check per tensor
    (``check(got, want) -> bool``, with the comparison's own tolerances), ``run(state,
    backward)`` nlref's tensors for a state, ``forward_names`` the rows the forward
    computes.
    """

    got: Mapping[str, np.ndarray]
    bounds: Mapping[str, Callable[[np.ndarray, np.ndarray], bool]]
    run: Callable[[State, bool], dict[str, np.ndarray]]
    forward_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class Change:
    """One convention changed.

    Attributes
    ----------
    group : str
        At most one change of a group is tried at a time (one scale, one pool kernel).
    apply : callable
        ``apply(state, context) -> State or None``.
    describe : callable
        ``describe(before, after) -> str``: "field: the module behaves as ..., nlref
        used ...".
    override : callable, optional
        ``override(after) -> dict`` of :func:`nlref.testing.compare` arguments that check
        the module with this convention.
    fallback : bool
        Reported only where no other change of its group explains the module (a value
        fitted to the module, beside the named values of the same convention).
    """

    group: str
    apply: Callable[[State, Context], State | None]
    describe: Callable[[State, State], str]
    override: Callable[[State], dict[str, Any]] | None = None
    fallback: bool = False


def _matches(state: State, context: Context) -> bool:
    try:
        want = context.run(state, True)
    except (ValueError, TypeError, FloatingPointError):
        return False
    for adjust in state.adjust:
        want = adjust(want)
    for name, got in context.got.items():
        if name not in want or np.shape(want[name]) != np.shape(got):
            return False
        if not context.bounds[name](got, want[name]):
            return False
    return True


def search(
    base: State, changes: Sequence[Change], context: Context, max_changes: int = 2
) -> list[list[tuple[Change, State]]]:
    """The sets of up to ``max_changes`` changes under which the module matches nlref.

    Single changes first; pairs only when no single change explains the module. Returns
    a list of explanations, each a list of ``(change, state after it)``.
    """
    found: list[list[tuple[Change, State]]] = []
    for size in range(1, max_changes + 1):
        for combo in itertools.combinations(changes, size):
            if len({c.group for c in combo}) < size:
                continue
            state: State | None = base
            steps = []
            for change in combo:
                state = change.apply(state, context)
                if state is None:
                    break
                steps.append((change, state))
            if state is not None and _matches(state, context):
                found.append(steps)
        if found:
            return _without_fallbacks(found)
    return found


def _without_fallbacks(
    found: list[list[tuple[Change, State]]],
) -> list[list[tuple[Change, State]]]:
    """Drop the explanations that use a fallback change where another one, with the same
    groups and no fallback, explains the module too."""

    def groups(steps: list[tuple[Change, State]]) -> frozenset[str]:
        return frozenset(c.group for c, _ in steps)

    plain = {groups(steps) for steps in found if not any(c.fallback for c, _ in steps)}
    return [
        steps
        for steps in found
        if not (any(c.fallback for c, _ in steps) and groups(steps) in plain)
    ]


def explain(base: State, found: list[list[tuple[Change, State]]]) -> str | None:
    """The diagnosis text of :func:`search`'s result, or None when nothing explains it."""
    if not found:
        return None

    def text(steps: list[tuple[Change, State]]) -> str:
        final = steps[-1][1]
        parts = [change.describe(base, final) for change, _ in steps]
        kwargs: dict[str, Any] = {}
        for change, _ in steps:
            if change.override is not None:
                kwargs.update(change.override(final))
        hint = ""
        if all(change.override is not None for change, _ in steps):
            args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
            hint = f" [compare(..., {args}) matches]"
        return "; and ".join(parts) + hint

    if len(found) == 1:
        return "diagnosis: " + text(found[0])
    lines = ["diagnosis: any one of these explains the module:"]
    lines += [f"  - {text(steps)}" for steps in found]
    return "\n".join(lines)
