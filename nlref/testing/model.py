""":func:`check_model`: every Non-local block of a whole model against nlref."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from .oracle import compare
from .report import ModelReport, ModelRow

__all__ = ["check_model", "find_blocks"]


def find_blocks(model: Any, layouts: Iterable[Any] | None = None) -> list[tuple[str, Any, Any]]:
    """The recognised blocks of ``model``: ``(dotted path, module, Layout)``, in module order.

    A block is a sub-module in one of ``layouts`` or of the registered layouts (tried in
    that order; among several that fit, the one that requires the most attributes); the
    search does not descend into a block.
    """
    from ..interop.torch import LAYOUTS, get_layout, recognised_layout

    own = [get_layout(x) for x in (layouts or ())]
    found: list[tuple[str, Any, Any]] = []

    def visit(module: Any, path: str) -> None:
        layout = recognised_layout(module, own) or recognised_layout(module, LAYOUTS.values())
        if layout is not None:
            found.append((path, module, layout))
            return
        for name, child in module.named_children():
            visit(child, f"{path}.{name}" if path else name)

    visit(model, "")
    return found


def check_model(
    model: Any, *inputs: Any, layouts: Iterable[Any] | None = None, **compare_kwargs: Any
) -> ModelReport:
    """Check every recognised Non-local block (or block of its family) of ``model`` against
    nlref.

    The model runs once, on a deep copy (so that its BN statistics do not move), on
    ``inputs``; the input of each block's first call is captured, and each block is then
    compared with :func:`nlref.testing.compare` on that input.

    Parameters
    ----------
    model : torch.nn.Module
    *inputs
        What ``model(*inputs)`` takes.
    layouts : iterable of str or Layout, optional
        Layouts of your own blocks, tried before the registered ones.
    **compare_kwargs
        For each :func:`compare` (``dtype``, ``randomize``, ``training``, ``rtol``, ...).

    Returns
    -------
    ModelReport
        One row per block (its path, layout, ok, worst error, first divergence, and its
        full report); ``ok`` when every block matches.

    Raises
    ------
    ValueError
        If the model has no recognised block; the message lists the layouts tried.
    """
    import torch

    from ..interop.torch import LAYOUTS, get_layout

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    runner = copy.deepcopy(model)
    blocks = find_blocks(runner, layouts)
    if not blocks:
        names = [*LAYOUTS, *(get_layout(x).name for x in (layouts or ()))]
        raise ValueError(
            f"no recognised Non-local block in {type(model).__name__}: none of its sub-modules "
            f"has the parts of a layout {tuple(names)}; pass layouts=[nlref.interop.torch."
            "Layout(theta=..., phi=..., g=..., z=..., bn=...)] describing yours"
        )
    captured: dict[str, Any] = {}
    handles = []
    for path, module, _ in blocks:

        def keep(mod: Any, args: tuple, path: str = path) -> None:
            if path not in captured and args:
                captured[path] = args[0].detach().clone()

        handles.append(module.register_forward_pre_hook(keep))
    try:
        with torch.no_grad():
            runner(*inputs)
    finally:
        for h in handles:
            h.remove()

    originals = dict(model.named_modules())
    rows = []
    for path, _, layout in blocks:
        original = originals[path]
        row = ModelRow(path, layout.name, type(original).__name__, family=layout.family)
        if path not in captured:
            rows.append(replace(row, error="the model never called it"))
            continue
        try:
            report = compare(original, captured[path], layout=layout, **compare_kwargs)
        except (TypeError, ValueError) as err:
            rows.append(replace(row, error=f"{type(err).__name__}: {err}"))
            continue
        rows.append(replace(row, report=report))
    return ModelReport(model=type(model).__name__, rows=tuple(rows))
