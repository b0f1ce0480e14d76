"""Real modules for the oracle: :func:`randomize` their weights, :func:`make_module` from
their packages, and timm's ``NonLocalAttn`` without torchvision
(:func:`load_timm_nonlocal_attn`)."""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types
from typing import Any

import numpy as np

from .. import presets

__all__ = ["MODULE_LAYOUTS", "load_timm_nonlocal_attn", "make_module", "randomize"]

#: Layouts that :func:`make_module` builds from their real PyPI packages.
MODULE_LAYOUTS = ("mmcv", "pytorchvideo", "timm")

_PACKAGES = {
    "mmcv": "mmcv-lite==2.2.0 mmengine",
    "pytorchvideo": "pytorchvideo==0.1.5",
    "timm": "timm",
}


def randomize(module: Any, rng: int | np.random.Generator | None = 0) -> Any:
    """Give every parameter and BN buffer of ``module`` a random, non-degenerate value.

    Conv weights N(0, 1/fan_in), biases N(0, 0.2²), BN γ ∈ [0.5, 1.5], β and running mean
    N(0, 0.2²), running variance ∈ [0.5, 2]: unlike the implementations' own
    initialisations (BN γ = 0, which makes the block the identity and most gradients
    zero), every tensor of the comparison then carries information. In place; returns
    ``module``. Random numbers come from NumPy, so a seed gives the same values anywhere.
    """
    import torch
    from torch import nn

    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)

    def fill(t: Any, values: np.ndarray) -> None:
        t.copy_(torch.as_tensor(values.reshape(tuple(t.shape)), dtype=t.dtype))

    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                c = mod.num_features
                if mod.affine:
                    fill(mod.weight, gen.uniform(0.5, 1.5, c))
                    fill(mod.bias, gen.normal(0.0, 0.2, c))
                if mod.track_running_stats:
                    fill(mod.running_mean, gen.normal(0.0, 0.2, c))
                    fill(mod.running_var, gen.uniform(0.5, 2.0, c))
                continue
            for name, p in mod.named_parameters(recurse=False):
                if name == "weight" and p.dim() >= 2:
                    fan_in = int(np.prod(tuple(p.shape[1:])))
                    fill(p, gen.normal(0.0, 1.0 / math.sqrt(fan_in), tuple(p.shape)))
                else:
                    fill(p, gen.normal(0.0, 0.2, tuple(p.shape)))
    return module


def load_timm_nonlocal_attn() -> type:
    """timm's ``NonLocalAttn`` class, even where torchvision does not import.

    timm's package imports torchvision, and the torchvision wheel that installs beside
    torch 2.13.0 (CPU) fails to import. ``NonLocalAttn`` itself needs nothing from it, so
    when ``from timm.layers import NonLocalAttn`` fails this loads the real
    ``timm/layers/non_local_attn.py`` (and the timm modules it imports) without running
    timm's package ``__init__``, with a stub ``torchvision.ops.misc`` that only satisfies
    the import of ``FrozenBatchNorm2d`` in ``timm.layers.norm_act``. ``sys.modules`` is
    restored afterwards.

    Raises
    ------
    ImportError
        If timm is not installed.
    """
    try:
        from timm.layers import NonLocalAttn

        return NonLocalAttn
    except ImportError as err:
        if importlib.util.find_spec("timm") is None:
            raise ImportError("timm is not installed: pip install timm") from err
    except Exception:  # torchvision raising RuntimeError on import
        pass
    import torch

    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover
        raise ImportError("timm is not installed: pip install timm")
    root = next(iter(spec.submodule_search_locations))
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in ("timm", "torchvision")}
    for k in saved:
        del sys.modules[k]

    def package(name: str, path: list[str]) -> types.ModuleType:
        mod = types.ModuleType(name)
        mod.__path__ = path
        sys.modules[name] = mod
        return mod

    try:
        package("torchvision", [])
        package("torchvision.ops", [])
        misc = types.ModuleType("torchvision.ops.misc")

        class FrozenBatchNorm2d(torch.nn.Module):  # only imported, never used by NonLocalAttn
            pass

        misc.FrozenBatchNorm2d = FrozenBatchNorm2d
        sys.modules["torchvision.ops.misc"] = misc
        package("timm", [root])
        package("timm.layers", [f"{root}/layers"])
        module = importlib.import_module("timm.layers.non_local_attn")
        return module.NonLocalAttn
    finally:
        for k in [k for k in sys.modules if k.split(".")[0] in ("timm", "torchvision")]:
            del sys.modules[k]
        sys.modules.update(saved)


def make_module(
    layout: str,
    in_channels: int = 8,
    *,
    pairwise: str = "embedded_gaussian",
    dims: int = 2,
    sub_sample: bool | tuple[int, ...] = False,
    norm: bool = True,
    inter_channels: int | None = None,
) -> Any:
    """Build a real Non-local module of ``layout`` from its own package.

    Parameters
    ----------
    layout : {"mmcv", "pytorchvideo", "timm"}
        mmcv ``NonLocal{dims}d(in_channels, mode=pairwise, sub_sample=..., norm_cfg=BN or
        None)``; pytorchvideo ``create_nonlocal(dim_in, dim_inner, pool_size,
        instantiation, norm=BatchNorm3d or None)`` (3-D only); timm
        ``NonLocalAttn(in_channels, rd_channels=inter_channels)`` (2-D, always BN, no
        pooling). AlexHex7 is not on PyPI: build its module yourself.
    sub_sample : bool or tuple
        mmcv takes a bool; pytorchvideo a bool (``(1, 2, 2)``) or its ``pool_size``.

    Raises
    ------
    ValueError
        For a layout that cannot be built or an option it does not have.
    ImportError
        If the package is not installed (the message says what to install).
    """
    if layout not in MODULE_LAYOUTS:
        raise ValueError(
            f"make_module builds {MODULE_LAYOUTS} from their packages, got {layout!r}"
            + (
                " (AlexHex7 is not on PyPI: build its module yourself)"
                if layout == "alexhex7"
                else ""
            )
        )
    try:
        if layout == "mmcv":
            from mmcv.cnn import NonLocal1d, NonLocal2d, NonLocal3d
        elif layout == "pytorchvideo":
            from pytorchvideo.layers.nonlocal_net import create_nonlocal
    except ImportError as err:
        raise ImportError(f"layout {layout!r} needs: pip install {_PACKAGES[layout]}") from err

    if layout == "mmcv":
        if dims not in (1, 2, 3):
            raise ValueError(f"mmcv has NonLocal1d/2d/3d, got dims={dims!r}")
        if not isinstance(sub_sample, bool):
            raise ValueError(f"mmcv's sub_sample is a bool, got {sub_sample!r}")
        cls = {1: NonLocal1d, 2: NonLocal2d, 3: NonLocal3d}[dims]
        bn = {1: "BN1d", 2: "BN", 3: "BN3d"}[dims]  # mmcv's "BN" is BatchNorm2d
        reduction = 2 if inter_channels is None else in_channels // inter_channels
        module = cls(
            in_channels,
            reduction=reduction,
            mode=pairwise,
            sub_sample=sub_sample,
            norm_cfg=dict(type=bn) if norm else None,
        )
        if module.inter_channels != (inter_channels or module.inter_channels):
            raise ValueError(
                f"mmcv sets C′ = max(C // reduction, 1); C′={inter_channels} is not reachable "
                f"from C={in_channels}"
            )
        return module
    if layout == "pytorchvideo":
        import torch

        if dims != 3:
            raise ValueError(f"pytorchvideo's NonLocal is 3-D only, got dims={dims!r}")
        preset = presets.get("pytorchvideo")
        if pairwise not in preset.pairwise:
            raise ValueError(f"pytorchvideo has pairwise {preset.pairwise}, got {pairwise!r}")
        pool = (1, 2, 2) if sub_sample is True else (1, 1, 1) if not sub_sample else sub_sample
        return create_nonlocal(
            dim_in=in_channels,
            dim_inner=inter_channels or max(in_channels // 2, 1),
            pool_size=tuple(pool),
            instantiation=preset.native_name(pairwise),
            norm=torch.nn.BatchNorm3d if norm else None,
        )
    # timm
    if dims != 2 or sub_sample or not norm or pairwise != "embedded_gaussian":
        raise ValueError(
            "timm's NonLocalAttn is 2-D, embedded Gaussian, with BN and no pooling; got "
            f"dims={dims}, pairwise={pairwise!r}, sub_sample={sub_sample!r}, norm={norm!r}"
        )
    return load_timm_nonlocal_attn()(in_channels, rd_channels=inter_channels)
