r"""PyTorch Non-local modules and checkpoints -> nlref ``(cfg, params)``, and back.

Four weight layouts are recognised (:data:`nlref.interop.LAYOUTS`):

=============  ==============================================================================
layout         module and state_dict keys
=============  ==============================================================================
mmcv           ``NonLocal1d/2d/3d``: ``g.conv.*``, ``theta.conv.*``, ``phi.conv.*`` (``g.0.conv.*``,
               ``phi.0.conv.*`` when sub-sampled), ``conv_out.conv.*``, ``conv_out.bn.*``,
               ``concat_project.conv.weight``
timm           ``NonLocalAttn``: ``t.*``, ``p.*``, ``g.*``, ``z.*``, ``norm.*``
pytorchvideo   ``NonLocal`` (``create_nonlocal``): ``conv_theta.*``, ``conv_phi.*``, ``conv_g.*``,
               ``conv_out.*``, ``norm.*``
alexhex7       ``_NonLocalBlockND``: ``g.*``, ``theta.*``, ``phi.*`` (``g.0.*``, ``phi.0.*`` when
               sub-sampled), ``W.0.*`` and ``W.1.*`` (``W.*`` without ``bn_layer``),
               ``concat_project.0.weight``
=============  ==============================================================================

:func:`from_torch` reads a module: the weights from its ``state_dict`` and what the weights
cannot tell (the variant, the logit scale, the pool kernel, BN ε and momentum) from its
attributes. :func:`from_state_dict` reads a checkpoint: what its keys cannot tell comes
from the layout's preset (:func:`nlref.preset`) and from ``**cfg_overrides``; where the keys
are ambiguous (the embedded Gaussian and the dot product have the same weights) it asks for
``pairwise=`` rather than guess. Files load with ``torch.load(..., weights_only=True)`` (or
safetensors): nothing unpickles arbitrary objects.

The 1×1(×1) conv weights lose their trailing kernel dims: (C′, C, 1, 1) -> (C′, C), and
the concatenation's (1, 2C′, 1, 1) -> (2C′,). ``num_batches_tracked`` is ignored.

This module imports torch; ``import nlref`` does not.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import presets
from ..config import NonLocalConfig
from ..params import param_shapes
from . import LAYOUTS

__all__ = [
    "LAYOUTS",
    "LAYOUT_KEYS",
    "detect_layout",
    "from_state_dict",
    "from_torch",
    "key_map",
    "load_checkpoint",
    "module_layout",
    "to_state_dict",
]

#: What each layout looks like, for error messages and the docs.
LAYOUT_KEYS: dict[str, str] = {
    "mmcv": "mmcv NonLocal1d/2d/3d: g.conv.*, theta.conv.*, phi.conv.* (g.0.conv.*, "
    "phi.0.conv.* when sub-sampled), conv_out.conv.*, conv_out.bn.*, concat_project.conv.weight",
    "timm": "timm NonLocalAttn: t.*, p.*, g.*, z.*, norm.*",
    "pytorchvideo": "pytorchvideo NonLocal / create_nonlocal: conv_theta.*, conv_phi.*, "
    "conv_g.*, conv_out.*, norm.*",
    "alexhex7": "AlexHex7 _NonLocalBlockND: g.*, theta.*, phi.* (g.0.*, phi.0.* when "
    "sub-sampled), W.0.* + W.1.* (W.* without bn_layer), concat_project.0.weight",
}

_IGNORED_SUFFIXES = (".num_batches_tracked",)
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _supported() -> str:
    return "\n".join(f"  - {layout}: {LAYOUT_KEYS[layout]}" for layout in LAYOUTS)


def _check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    return layout


# --------------------------------------------------------------------------- key maps


def _layer_prefixes(layout: str, cfg: NonLocalConfig) -> dict[str, str]:
    sub = cfg.sub_sample is not None
    if layout == "mmcv":
        return {
            "theta": "theta.conv",
            "phi": "phi.0.conv" if sub else "phi.conv",
            "g": "g.0.conv" if sub else "g.conv",
            "concat": "concat_project.conv",
            "z": "conv_out.conv",
            "bn": "conv_out.bn",
        }
    if layout == "alexhex7":
        return {
            "theta": "theta",
            "phi": "phi.0" if sub else "phi",
            "g": "g.0" if sub else "g",
            "concat": "concat_project.0",
            "z": "W.0" if cfg.norm is not None else "W",
            "bn": "W.1",
        }
    if layout == "timm":
        return {"theta": "t", "phi": "p", "g": "g", "z": "z", "bn": "norm"}
    return {  # pytorchvideo
        "theta": "conv_theta",
        "phi": "conv_phi",
        "g": "conv_g",
        "z": "conv_out",
        "bn": "norm",
    }


def key_map(layout: str, cfg: NonLocalConfig) -> dict[str, str]:
    """nlref parameter name -> the layout's state_dict key, for every name of ``cfg``.

    >>> import nlref
    >>> from nlref.interop.torch import key_map
    >>> key_map("mmcv", nlref.preset("mmcv", 8, sub_sample=True, dims=2))["g.weight"]
    'g.0.conv.weight'
    """
    _check_layout(layout)
    prefixes = _layer_prefixes(layout, cfg)
    out = {}
    for name in param_shapes(cfg):
        layer, _, kind = name.partition(".")
        if layer not in prefixes:
            raise ValueError(f"layout {layout!r} has no place for nlref parameter {name!r}")
        out[name] = f"{prefixes[layer]}.{kind}"
    return out


def detect_layout(keys: Any) -> str:
    """The layout whose characteristic keys ``keys`` (a state_dict or its keys) contain.

    Raises
    ------
    ValueError
        If no layout matches; the message lists the supported layouts and some keys seen.
    """
    ks = set(keys)
    if {"t.weight", "p.weight", "g.weight", "z.weight"} <= ks:
        return "timm"
    if {"conv_theta.weight", "conv_g.weight", "conv_out.weight"} <= ks:
        return "pytorchvideo"
    if ("g.conv.weight" in ks or "g.0.conv.weight" in ks) and "conv_out.conv.weight" in ks:
        return "mmcv"
    if ("g.weight" in ks or "g.0.weight" in ks) and ("W.weight" in ks or "W.0.weight" in ks):
        return "alexhex7"
    seen = sorted(ks)[:8]
    raise ValueError(
        f"cannot tell the layout of a state_dict with keys {seen}"
        f"{' ...' if len(ks) > 8 else ''}; supported layouts:\n{_supported()}\n"
        "pass layout=..., and prefix=... if the block sits inside a larger model"
    )


# --------------------------------------------------------------------------- state_dict


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint file as a dict of tensors, never unpickling arbitrary objects.

    ``.safetensors`` files load with safetensors; anything else with
    ``torch.load(path, map_location="cpu", weights_only=True)``, which refuses pickled
    objects other than tensors and plain containers.

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    ValueError
        If the file cannot be loaded that way (truncated, not a checkpoint, or holding
        pickled objects); the message names the file.
    TypeError
        If it loads but is not a mapping of name -> tensor.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(f"reading {path} needs safetensors: pip install safetensors") from err
        loader, call = "safetensors", lambda: dict(load_file(path, device="cpu"))
    else:
        loader = "torch.load(weights_only=True)"
        call = lambda: torch.load(path, map_location="cpu", weights_only=True)  # noqa: E731
    try:
        loaded = call()
    except Exception as err:  # truncated, garbage, or pickled objects that were refused
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(
            f"cannot load checkpoint {path} with {loader}: {type(err).__name__}: {first}"
        ) from err
    if not isinstance(loaded, Mapping):
        raise TypeError(
            f"{path} holds a {type(loaded).__name__}, not a state_dict (a mapping of name -> "
            "tensor)"
        )
    return dict(loaded)


def from_state_dict(
    state_dict: Mapping[str, Any] | str | os.PathLike[str],
    layout: str | None = None,
    *,
    prefix: str = "",
    dtype: str | None = "float64",
    **cfg_overrides: Any,
) -> tuple[NonLocalConfig, dict[str, np.ndarray]]:
    """Read a Non-local block's weights from a state_dict or checkpoint file.

    Parameters
    ----------
    state_dict : mapping or path
        Name -> tensor (or NumPy array), or a file (loaded by :func:`load_checkpoint`). A
        checkpoint with a ``"state_dict"`` entry (mmengine's) is unwrapped.
    layout : str, optional
        One of :data:`LAYOUTS`; detected from the keys when None (:func:`detect_layout`).
    prefix : str
        Read only the keys that start with ``prefix`` (a block inside a larger model, e.g.
        ``"backbone.layer3.1.nonlocal_block."``), with the prefix removed.
    dtype : {"float64", "float32", None}
        The dtype of the returned arrays; None keeps the checkpoint's (half precision
        becomes float32).
    **cfg_overrides
        :func:`nlref.preset` overrides for what the keys cannot tell. ``pairwise`` is
        required where the keys are ambiguous (embedded Gaussian vs dot product, in every
        layout but timm). The pool kernel of pytorchvideo is not in its keys: pass
        ``sub_sample=(1, 2, 2)`` (or ``True``) for a pooled block. mmcv's
        ``use_scale=False`` is ``scale=None``.

    Returns
    -------
    cfg : NonLocalConfig
    params : dict
        nlref name -> NumPy array, the keys of :func:`nlref.param_shapes` (``cfg``).

    Raises
    ------
    ValueError
        For an unknown or undetectable layout, an ambiguous variant, or keys that do not
        match the config exactly (the message lists the missing and unexpected keys).
    """
    if isinstance(state_dict, (str, os.PathLike)):
        state_dict = load_checkpoint(state_dict)
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict must be a mapping of name -> tensor or a path, got "
            f"{type(state_dict).__name__}"
        )
    inner = state_dict.get("state_dict")
    if isinstance(inner, Mapping):
        state_dict = inner
    if dtype not in (None, *_DTYPES):
        raise ValueError(f"dtype must be 'float64', 'float32' or None, got {dtype!r}")
    sd = {
        k[len(prefix) :]: v
        for k, v in state_dict.items()
        if isinstance(k, str) and k.startswith(prefix) and not k.endswith(_IGNORED_SUFFIXES)
    }
    if not sd:
        raise ValueError(
            f"no key of the state_dict starts with prefix {prefix!r} "
            f"(first keys: {sorted(map(str, state_dict))[:5]})"
        )
    layout = detect_layout(sd) if layout is None else _check_layout(layout)
    cfg = _infer_config(layout, sd, cfg_overrides)
    return cfg, _convert(layout, cfg, sd, dtype)


def _first(sd: Mapping[str, Any], *keys: str) -> str:
    for k in keys:
        if k in sd:
            return k
    raise ValueError(f"expected one of the keys {list(keys)}; got {sorted(sd)[:10]}")


def _infer_config(
    layout: str, sd: Mapping[str, Any], overrides: Mapping[str, Any]
) -> NonLocalConfig:
    g_key = {
        "mmcv": ("g.conv.weight", "g.0.conv.weight"),
        "alexhex7": ("g.weight", "g.0.weight"),
        "timm": ("g.weight",),
        "pytorchvideo": ("conv_g.weight",),
    }[layout]
    g_weight = sd[_first(sd, *g_key)]
    shape = tuple(g_weight.shape)
    if len(shape) < 3:
        raise ValueError(
            f"expected the g projection to be a conv weight (C′, C, 1[, 1[, 1]]), got {shape}"
        )
    dims = len(shape) - 2
    inter, in_channels = int(shape[0]), int(shape[1])
    found: dict[str, Any] = {"inter_channels": inter}

    if layout in ("mmcv", "alexhex7"):
        mm = layout == "mmcv"
        concat = "concat_project.conv.weight" if mm else "concat_project.0.weight"
        theta = "theta.conv.weight" if mm else "theta.weight"
        if concat in sd:
            found["pairwise"] = "concatenation"
        elif theta not in sd:
            found["pairwise"] = "gaussian"
        found["sub_sample"] = g_key[1] in sd  # True: the layout's kernel for these dims
        has_bn = ("conv_out.bn.weight" if mm else "W.1.weight") in sd
        found["norm"] = "batchnorm" if has_bn else None
    else:
        found["norm"] = "batchnorm" if "norm.weight" in sd else None

    if "pairwise" not in found and "pairwise" not in overrides:
        options = presets.get(layout).pairwise
        if len(options) > 1:
            raise ValueError(
                f"the {layout} state_dict keys cannot tell the variant apart (the embedded "
                f"Gaussian and the dot product have the same weights); pass pairwise=, one "
                f"of {tuple(v for v in options if v in ('embedded_gaussian', 'dot_product'))}"
            )
    # overrides win; an inconsistent one is caught by the exact key check in _convert
    return presets.preset(layout, in_channels, dims=dims, **{**found, **overrides})


def _to_numpy(value: Any, dtype: str | None) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu")
        if dtype is not None:
            t = t.to(_DTYPES[dtype])
        elif t.dtype in (torch.float16, torch.bfloat16):
            t = t.to(torch.float32)
        return t.numpy().copy()
    a = np.asarray(value)
    return a.astype(dtype if dtype is not None else np.result_type(a, np.float32), copy=True)


def _convert(
    layout: str, cfg: NonLocalConfig, sd: Mapping[str, Any], dtype: str | None
) -> dict[str, np.ndarray]:
    kmap = key_map(layout, cfg)
    expected, present = set(kmap.values()), set(sd)
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        parts = [f"missing {missing}"] if missing else []
        parts += [f"unexpected {unexpected}"] if unexpected else []
        raise ValueError(
            f"the {layout} state_dict does not match the config (pairwise={cfg.pairwise!r}, "
            f"sub_sample={cfg.sub_sample}, norm={cfg.norm!r}, biases={cfg.biases}): "
            + "; ".join(parts)
            + ". Pass the overrides that match the checkpoint (pairwise=, sub_sample=, norm=, "
            "biases=)"
        )
    shapes = param_shapes(cfg)
    params = {}
    for name, key in kmap.items():
        a = _to_numpy(sd[key], dtype)
        want = shapes[name]
        if name == "concat.weight":  # (1, 2C', 1, 1) conv -> (2C',)
            ok = a.ndim >= 2 and a.shape[0] == 1 and a.shape[1] == want[0]
            ok = ok and all(s == 1 for s in a.shape[2:])
        else:
            ok = a.shape[: len(want)] == want and all(s == 1 for s in a.shape[len(want) :])
        if not ok:
            raise ValueError(
                f"{key!r} has shape {tuple(a.shape)}; nlref's {name!r} needs {want} "
                "(with trailing 1×1 kernel dims for a conv weight)"
            )
        params[name] = np.ascontiguousarray(a.reshape(want))
    return params


def to_state_dict(
    cfg: NonLocalConfig,
    params: Mapping[str, Any],
    layout: str,
    *,
    dims: int,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The inverse of :func:`from_state_dict`: nlref params as a ``layout`` state_dict.

    Conv weights get their trailing 1×1(×1) dims back (``dims`` of them; the
    concatenation projection is always a 2-D conv, as in mmcv and AlexHex7), and BN gets a
    ``num_batches_tracked`` of 0, so that ``module.load_state_dict(...)`` accepts it.
    """
    _check_layout(layout)
    if dims not in (1, 2, 3):
        raise ValueError(f"dims must be 1, 2 or 3, got {dims!r}")
    out: dict[str, torch.Tensor] = {}
    for name, key in key_map(layout, cfg).items():
        t = torch.as_tensor(np.asarray(params[name]))
        if dtype is not None:
            t = t.to(dtype)
        if name == "concat.weight":
            t = t.reshape(1, -1, 1, 1)
        elif name.endswith(".weight") and not name.startswith("bn."):
            t = t.reshape(*t.shape, *([1] * dims))
        out[key] = t.clone()
    if cfg.norm is not None:
        bn = _layer_prefixes(layout, cfg)["bn"]
        out[f"{bn}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return out


# --------------------------------------------------------------------------- modules


def module_layout(module: nn.Module) -> str:
    """The layout of a PyTorch Non-local module, recognised from its sub-modules.

    Raises
    ------
    TypeError
        If it is none of :data:`LAYOUTS`; the message lists them.
    """

    def has(*names: str) -> bool:
        return all(isinstance(getattr(module, n, None), nn.Module) for n in names)

    if has("conv_theta", "conv_phi", "conv_g", "conv_out") and hasattr(module, "instantiation"):
        return "pytorchvideo"
    if has("t", "p", "g", "z", "norm"):
        return "timm"
    if has("g", "conv_out") and isinstance(getattr(module, "mode", None), str):
        return "mmcv"
    if has("g", "W"):
        return "alexhex7"
    cls = type(module)
    raise TypeError(
        f"from_torch does not recognise {cls.__module__}.{cls.__qualname__} as a Non-local "
        f"block; supported layouts:\n{_supported()}\n"
        "pass layout=... if it follows one of them, or read its state_dict with "
        "from_state_dict"
    )


def _kernel_tuple(value: Any, dims: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dims
    return tuple(int(v) for v in value)


def _pool_kernel(pool: nn.Module, dims: int, where: str) -> tuple[int, ...]:
    pools = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
    if not isinstance(pool, pools[dims]):
        raise ValueError(f"{where} is {pool!r}; nlref sub-samples with a max-pool")
    kernel = _kernel_tuple(pool.kernel_size, dims)
    stride = kernel if pool.stride is None else _kernel_tuple(pool.stride, dims)
    plain = (
        stride == kernel
        and _kernel_tuple(pool.padding, dims) == (0,) * dims
        and _kernel_tuple(pool.dilation, dims) == (1,) * dims
        and not pool.ceil_mode
        and not pool.return_indices
    )
    if not plain:
        raise ValueError(
            f"{where} is {pool!r}; nlref's max-pool has kernel = stride, no padding, "
            "dilation 1 and floor mode"
        )
    return kernel


def _bn_settings(bn: nn.Module, where: str) -> dict[str, float]:
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise ValueError(f"{where} is {bn!r}; nlref's only norm is batch norm")
    if not bn.affine or not bn.track_running_stats or bn.momentum is None:
        raise ValueError(
            f"{where} is {bn!r}; nlref's batch norm is affine, tracks running statistics and "
            "has a momentum (not None)"
        )
    return {"bn_eps": float(bn.eps), "bn_momentum": float(bn.momentum)}


def _check_convs(module: nn.Module) -> None:
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            d = len(m.kernel_size)
            padding = m.padding  # a tuple of ints, or "valid" / "same"
            plain = (
                tuple(m.kernel_size) == (1,) * d
                and tuple(m.stride) == (1,) * d
                and tuple(m.dilation) == (1,) * d
                and padding in ((0,) * d, "valid")
                and m.groups == 1
                and not m.transposed
            )
            if not plain:
                raise ValueError(
                    f"layer {name!r} is {m!r}; nlref's projections are 1×1 convs with stride "
                    "1, no padding and one group"
                )


def _alexhex7_pairwise(module: nn.Module) -> str | None:
    if isinstance(getattr(module, "concat_project", None), nn.Module):
        return "concatenation"
    if not isinstance(getattr(module, "theta", None), nn.Module):
        return "gaussian"
    # AlexHex7 keeps each variant in its own file, all with the class _NonLocalBlockND
    origin = type(module).__module__.rsplit(".", 1)[-1]
    for name in ("embedded_gaussian", "dot_product"):
        if name in origin:
            return name
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return None
    if "softmax" in source:
        return "embedded_gaussian"
    return "dot_product" if "/" in source else None


def _module_overrides(layout: str, module: nn.Module) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if layout == "mmcv":
        found["pairwise"] = module.mode
        if module.mode == "embedded_gaussian" and not module.use_scale:
            found["scale"] = None
        dims = module.g[0].conv.weight.dim() - 2 if module.sub_sample else None
        if module.sub_sample:
            found["sub_sample"] = _pool_kernel(module.g[1], dims, "g[1]")
        else:
            found["sub_sample"] = None
        if getattr(module.conv_out, "with_norm", False):
            found.update(_bn_settings(module.conv_out.norm, "conv_out.norm"))
        if getattr(module.conv_out, "with_activation", False):
            raise ValueError("mmcv conv_out has an activation; nlref's W_z has none")
    elif layout == "timm":
        scale = float(module.scale)
        found["scale"] = None if scale == 1.0 else scale
        found.update(_bn_settings(module.norm, "norm"))
    elif layout == "pytorchvideo":
        inst = module.instantiation
        found["pairwise"] = {"softmax": "embedded_gaussian", "dot_product": "dot_product"}[inst]
        found["sub_sample"] = None if module.pool is None else _pool_kernel(module.pool, 3, "pool")
        if module.norm is not None:
            found.update(_bn_settings(module.norm, "norm"))
    else:  # alexhex7
        pairwise = _alexhex7_pairwise(module)
        if pairwise is not None:
            found["pairwise"] = pairwise
        if getattr(module, "sub_sample", False):
            g = module.g
            found["sub_sample"] = _pool_kernel(g[1], g[0].weight.dim() - 2, "g[1]")
        else:
            found["sub_sample"] = None
        if isinstance(module.W, nn.Sequential):
            found.update(_bn_settings(module.W[1], "W[1]"))
    return found


def from_torch(
    module: nn.Module,
    *,
    layout: str | None = None,
    dtype: str | None = "float64",
    **cfg_overrides: Any,
) -> tuple[NonLocalConfig, dict[str, np.ndarray]]:
    """The nlref config and parameters of a PyTorch Non-local module.

    Parameters
    ----------
    module : torch.nn.Module
        An mmcv ``NonLocal1d/2d/3d`` (any mode, with or without ``sub_sample`` and a BN
        ``norm_cfg``), a timm ``NonLocalAttn``, a pytorchvideo ``NonLocal`` (from
        ``create_nonlocal``), or a module in AlexHex7's ``_NonLocalBlockND`` layout.
    layout : str, optional
        Force one of :data:`LAYOUTS` instead of recognising it.
    dtype : {"float64", "float32", None}
        Of the returned arrays (None keeps the module's).
    **cfg_overrides
        Win over what is read from the module (for example ``pairwise=`` for an AlexHex7
        module whose variant cannot be told from its class).

    Returns
    -------
    cfg : NonLocalConfig
    params : dict
        nlref name -> NumPy array.

    Raises
    ------
    TypeError
        If ``module`` is not a recognised Non-local block; the message lists the layouts.
    ValueError
        If it uses something nlref does not model (a norm other than batch norm, a pool
        other than a plain max-pool, a conv that is not 1×1).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    layout = module_layout(module) if layout is None else _check_layout(layout)
    _check_convs(module)
    overrides = {**_module_overrides(layout, module), **cfg_overrides}
    return from_state_dict(module.state_dict(), layout, dtype=dtype, **overrides)
