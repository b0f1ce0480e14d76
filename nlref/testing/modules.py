"""Real modules for the oracle: :func:`randomize` their weights, :func:`make_module` from
their packages, and the loaders of the classes whose packages do not import here
(:func:`load_timm`, :func:`load_mmseg_dnl`, both through :func:`load_from_file`)."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .. import presets

__all__ = [
    "FAMILY_LAYOUTS",
    "MODULE_LAYOUTS",
    "load_from_file",
    "load_mmseg_dnl",
    "load_timm",
    "load_timm_nonlocal_attn",
    "make_module",
    "randomize",
]

#: The family's layouts that :func:`make_module` builds from their real packages.
FAMILY_LAYOUTS = ("mmcv-gc", "timm-gc", "dnl")
#: Layouts that :func:`make_module` builds from their real PyPI packages.
MODULE_LAYOUTS = ("mmcv", "pytorchvideo", "timm", *FAMILY_LAYOUTS)

_PACKAGES = {
    "mmcv": "mmcv-lite==2.2.0 mmengine",
    "mmcv-gc": "mmcv-lite==2.2.0 mmengine",
    "pytorchvideo": "pytorchvideo==0.1.5",
    "timm": "timm",
    "timm-gc": "timm",
    "dnl": "mmsegmentation==1.2.2 mmcv-lite==2.2.0 mmengine",
}


def randomize(module: Any, rng: int | np.random.Generator | None = 0) -> Any:
    """Give every parameter and BN buffer of ``module`` a random, non-degenerate value.

    Conv weights N(0, 1/fan_in), biases N(0, 0.2²), BN γ ∈ [0.5, 1.5], β and running mean
    N(0, 0.2²), running variance ∈ [0.5, 2], layer norm γ ∈ [0.5, 1.5] and β ∈ [−0.4, 0.4]:
    unlike the implementations' own
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
            if isinstance(mod, (nn.LayerNorm, nn.GroupNorm)):  # γ away from 0, like BN's
                for name, p in mod.named_parameters(recurse=False):
                    low, high = (0.5, 1.5) if name == "weight" else (-0.4, 0.4)
                    fill(p, gen.uniform(low, high, tuple(p.shape)))
                continue
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


def load_from_file(
    module: str, stubs: Mapping[str, Callable[[], types.ModuleType]] | None = None
) -> types.ModuleType:
    """Import ``module`` from its installed package without running the ``__init__`` of any
    package above it.

    Each package above ``module`` becomes an empty package on its real path, so that the
    module and the sibling modules it imports load from the real files. ``stubs`` (name ->
    a function that makes the module) stand in for modules it imports but never uses, in
    the order given; each may import what it needs (a stub package's real submodule).
    ``sys.modules`` is restored afterwards, for every top-level package involved: the
    classes loaded keep working, and nothing else sees the stubs.

    Raises
    ------
    ImportError
        If the top-level package is not installed.
    """
    stubs = dict(stubs or {})
    top = module.split(".")[0]
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{top} is not installed")
    root = next(iter(spec.submodule_search_locations))
    tops = {top, *(name.split(".")[0] for name in stubs)}
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in tops}
    for k in saved:
        del sys.modules[k]
    try:
        parts = module.split(".")
        for i in range(1, len(parts)):
            package = types.ModuleType(".".join(parts[:i]))
            package.__path__ = ["/".join([root, *parts[1:i]])]
            sys.modules[package.__name__] = package
        for name, make in stubs.items():
            sys.modules[name] = make()
        return importlib.import_module(module)
    finally:
        for k in [k for k in sys.modules if k.split(".")[0] in tops]:
            del sys.modules[k]
        sys.modules.update(saved)


def _package(name: str, path: list[str]) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__path__ = path
    sys.modules[name] = mod  # so that its real submodules can be imported by a later stub
    return mod


def _timm_stubs() -> dict[str, Callable[[], types.ModuleType]]:
    """What timm's model code needs from the packages that fail to import here: a
    ``torchvision.ops.misc.FrozenBatchNorm2d`` (imported by ``timm.layers``, used only by
    timm's frozen-BN helpers), timm's ``__version__``, and the constants of ``timm.data``
    (whose ``__init__`` imports torchvision's transforms)."""
    import torch

    spec = importlib.util.find_spec("timm")
    root = next(iter(spec.submodule_search_locations))

    def misc() -> types.ModuleType:
        _package("torchvision", [])
        _package("torchvision.ops", [])
        mod = types.ModuleType("torchvision.ops.misc")

        class FrozenBatchNorm2d(torch.nn.Module):  # a stand-in: imported, never built here
            pass

        mod.FrozenBatchNorm2d = FrozenBatchNorm2d
        return mod

    def timm() -> types.ModuleType:
        mod = _package("timm", [root])
        mod.__version__ = importlib.import_module("timm.version").__version__
        return mod

    def data() -> types.ModuleType:
        mod = _package("timm.data", [f"{root}/data"])
        constants = importlib.import_module("timm.data.constants")
        mod.__dict__.update({k: v for k, v in vars(constants).items() if k.isupper()})
        return mod

    return {"torchvision.ops.misc": misc, "timm": timm, "timm.data": data}


@functools.cache
def load_timm(module: str = "timm.layers") -> types.ModuleType:
    """A module of timm (``"timm.layers"``, ``"timm.layers.global_context"``,
    ``"timm.models.resnet"``, ...), even where timm's package does not import.

    timm's package imports torchvision, and the torchvision wheel that installs beside
    torch 2.13.0 (CPU) fails to import ("operator torchvision::nms does not exist"). timm's
    layers and models need nothing of it, so when ``import timm`` fails this loads the real
    module with :func:`load_from_file`: timm's package ``__init__`` is not run, a stub
    ``torchvision.ops.misc`` satisfies the one import ``timm.layers`` makes of torchvision
    (``FrozenBatchNorm2d``, which nothing here builds), and ``timm.data`` holds only its
    constants. ``timm.layers`` itself is imported for real. ``sys.modules`` is restored
    afterwards; the module is cached, so its classes are the same objects on every call.
    Models build and run as timm's own (``load_timm("timm.models.resnet").resnet18(
    block_args=dict(attn_layer="gc"))``); downloading pretrained weights is not
    supported this way.

    Raises
    ------
    ImportError
        If timm is not installed.
    """
    if importlib.util.find_spec("timm") is None:
        raise ImportError("timm is not installed: pip install timm")
    before = {k for k in sys.modules if k.split(".")[0] in ("timm", "torchvision")}
    try:
        return importlib.import_module(module)
    except Exception:  # torchvision raising RuntimeError on import
        for k in [k for k in sys.modules if k.split(".")[0] in ("timm", "torchvision")]:
            if k not in before:
                del sys.modules[k]  # what the failed import left half-initialised
    return load_from_file(module, _timm_stubs())


def load_timm_nonlocal_attn() -> type:
    """timm's ``NonLocalAttn`` class (``timm/layers/non_local_attn.py``), through
    :func:`load_timm`.

    Raises
    ------
    ImportError
        If timm is not installed.
    """
    return load_timm("timm.layers.non_local_attn").NonLocalAttn


@functools.cache
def load_mmseg_dnl() -> type:
    """mmsegmentation's ``DisentangledNonLocal2d``, the class in the installed wheel's
    ``mmseg/models/decode_heads/dnl_head.py``.

    mmsegmentation 1.2.2 does not import beside mmcv-lite 2.2.0: its ``__init__`` asserts
    mmcv < 2.2.0, and its model package needs mmcv's compiled ops. The file needs neither:
    this loads it with :func:`load_from_file`, with stand-ins for the two imports that only
    the file's other class, ``DNLHead``, uses (``FCNHead``, whose module pulls in the whole
    model package, and the registry it registers in). The class itself subclasses mmcv's
    real ``NonLocal2d``.

    Raises
    ------
    ImportError
        If mmsegmentation or mmcv is not installed.
    """
    import torch

    def fcn_head() -> types.ModuleType:
        stub = types.ModuleType("mmseg.models.decode_heads.fcn_head")
        stub.FCNHead = type("FCNHead", (torch.nn.Module,), {})
        return stub

    def registry() -> types.ModuleType:
        stub = types.ModuleType("mmseg.registry")
        stub.MODELS = types.SimpleNamespace(register_module=lambda: lambda cls: cls)
        return stub

    stubs = {"mmseg.registry": registry, "mmseg.models.decode_heads.fcn_head": fcn_head}
    return load_from_file("mmseg.models.decode_heads.dnl_head", stubs).DisentangledNonLocal2d


def make_module(
    layout: str,
    in_channels: int = 8,
    *,
    pairwise: str = "embedded_gaussian",
    dims: int = 2,
    sub_sample: bool | tuple[int, ...] = False,
    norm: bool = True,
    inter_channels: int | None = None,
    pooling: str = "att",
    fusion: tuple[str, ...] | None = None,
    temperature: float = 0.05,
    use_scale: bool = True,
) -> Any:
    """Build a real Non-local module (or one of its family) of ``layout`` from its own
    package.

    Parameters
    ----------
    layout : {"mmcv", "pytorchvideo", "timm", "mmcv-gc", "timm-gc", "dnl"}
        mmcv ``NonLocal{dims}d(in_channels, mode=pairwise, sub_sample=..., norm_cfg=BN or
        None)``; pytorchvideo ``create_nonlocal(dim_in, dim_inner, pool_size,
        instantiation, norm=BatchNorm3d or None)`` (3-D only); timm
        ``NonLocalAttn(in_channels, rd_channels=inter_channels)`` (2-D, always BN, no
        pooling). GCNet: mmcv ``ContextBlock(in_channels, ratio, pooling_type,
        fusion_types)`` (C′ = ``inter_channels``, default C/4) or timm
        ``GlobalContext(in_channels, use_attn, fuse_add, fuse_scale, rd_channels)``
        (default C′ timm's); DNL: mmsegmentation's ``DisentangledNonLocal2d(in_channels,
        temperature=..., use_scale=..., sub_sample=..., norm_cfg=BN or None)``. All three
        are 2-D. AlexHex7 is not on PyPI: build its module yourself.
    sub_sample : bool or tuple
        mmcv and DNL take a bool; pytorchvideo a bool (``(1, 2, 2)``) or its ``pool_size``.
    pooling : {"att", "avg"}
        GCNet's context.
    fusion : tuple of {"channel_add", "channel_mul"}, optional
        GCNet's fusions; default the package's (mmcv ``("channel_add",)``, timm
        ``("channel_mul",)``).
    temperature, use_scale
        DNL's τ and its 1/√C′ scale.

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
    if layout in FAMILY_LAYOUTS:
        return _make_family_module(
            layout, in_channels, dims=dims, sub_sample=sub_sample, norm=norm,
            inter_channels=inter_channels, pooling=pooling, fusion=fusion,
            temperature=temperature, use_scale=use_scale,
        )  # fmt: skip
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


def _make_family_module(
    layout: str,
    in_channels: int,
    *,
    dims: int,
    sub_sample: Any,
    norm: bool,
    inter_channels: int | None,
    pooling: str,
    fusion: tuple[str, ...] | None,
    temperature: float,
    use_scale: bool,
) -> Any:
    """The family's modules for :func:`make_module`."""
    from ..family import FUSIONS, POOLINGS

    if dims != 2:
        raise ValueError(f"{layout} builds a 2-D module, got dims={dims!r}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if fusion is not None and (not fusion or any(f not in FUSIONS for f in fusion)):
        raise ValueError(f"fusion must name one or both of {FUSIONS}, got {fusion!r}")
    if layout != "dnl" and (sub_sample or not norm):
        raise ValueError(f"{layout} has no sub_sample and no norm option")
    try:
        if layout == "mmcv-gc":
            from mmcv.cnn import ContextBlock
        elif layout == "timm-gc":
            context_cls = load_timm("timm.layers.global_context").GlobalContext
        else:
            dnl_cls = load_mmseg_dnl()
    except ImportError as err:
        raise ImportError(f"layout {layout!r} needs: pip install {_PACKAGES[layout]}") from err
    if layout == "mmcv-gc":
        inter = inter_channels or max(in_channels // 4, 1)
        ratio = inter / in_channels
        if int(in_channels * ratio) != inter:  # mmcv truncates C · ratio
            ratio = math.nextafter(ratio, math.inf)
        return ContextBlock(
            in_channels, ratio, pooling_type=pooling, fusion_types=fusion or ("channel_add",)
        )
    if layout == "timm-gc":
        fusion = fusion or ("channel_mul",)
        return context_cls(
            in_channels, use_attn=pooling == "att", fuse_add="channel_add" in fusion,
            fuse_scale="channel_mul" in fusion, rd_channels=inter_channels,
        )  # fmt: skip
    if not isinstance(sub_sample, bool):
        raise ValueError(f"DNL's sub_sample is a bool, got {sub_sample!r}")
    reduction = 2 if inter_channels is None else in_channels // inter_channels
    return dnl_cls(
        in_channels, reduction=reduction, temperature=temperature, use_scale=use_scale,
        mode="embedded_gaussian", sub_sample=sub_sample,
        norm_cfg=dict(type="BN") if norm else None,
    )  # fmt: skip
