r"""PyTorch Non-local modules and checkpoints -> nlref ``(cfg, params)``, and back.

A :class:`~nlref.interop.layouts.Layout` says where a module keeps each part of the block.
Seven are registered (:data:`nlref.interop.LAYOUTS`), and :func:`register_layout` adds more.
The Non-local blocks:

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

and the blocks of its family (:mod:`nlref.family`), which :func:`from_torch` reads as a
:class:`~nlref.family.GCNetConfig` or a :class:`~nlref.family.DNLConfig`:

=============  ==============================================================================
layout         module and state_dict keys
=============  ==============================================================================
mmcv-gc        ``ContextBlock``: ``conv_mask.*``, ``channel_add_conv.{0,1,3}.*``,
               ``channel_mul_conv.{0,1,3}.*`` (1×1 conv, layer norm, 1×1 conv)
timm-gc        ``GlobalContext``: ``conv_attn.*``, ``mlp_add.{fc1,norm,fc2}.*``,
               ``mlp_scale.{fc1,norm,fc2}.*``
dnl            mmsegmentation's ``DisentangledNonLocal2d``: mmcv's keys and ``conv_mask.*``
=============  ==============================================================================

Every function that takes a ``layout`` accepts a registered name or a ``Layout`` value, so
a hand-written block is read with no other code::

    mine = Layout(theta="query_conv", phi="key_conv", g="value_conv", z="out_conv", bn="out_bn")
    cfg, params = from_torch(block, layout=mine, pairwise="embedded_gaussian", scale=None)

:func:`from_torch` reads a module: the weights from its ``state_dict``; the variant from its
structure (a concatenation weight, or no θ for the Gaussian) or from the attributes the
layout declares (mmcv's ``mode``, pytorchvideo's ``instantiation``); the pool kernel from
its max-pool module; BN ε and momentum from its batch norm. Nothing reads the module's
source code: what neither the weights nor those attributes tell comes from the layout's
preset and from ``**cfg_overrides``, and where there is no preset to ask, a ``ValueError``
asks for it. :func:`from_state_dict` does the same from keys alone. Files load with
``torch.load(..., weights_only=True)`` (or safetensors): nothing unpickles arbitrary
objects.

The 1×1(×1) conv weights lose their trailing kernel dims: (C′, C, 1, 1) -> (C′, C), and
the concatenation's (1, 2C′, 1, 1) -> (2C′,). ``num_batches_tracked`` is ignored.

This module imports torch; ``import nlref`` does not.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import presets
from ..config import BIAS_LAYERS, NonLocalConfig
from ..family import FUSIONS, DNLConfig, GCNetConfig
from ..family import param_shapes as family_param_shapes
from ..pairwise import get as get_pairwise
from ..params import param_shapes as block_param_shapes
from .layouts import (
    LAYOUTS,
    Layout,
    get_layout,
    layout_names,
    register_layout,
    unregister_layout,
)

__all__ = [
    "LAYOUTS",
    "Config",
    "Layout",
    "detect_layout",
    "from_state_dict",
    "from_torch",
    "get_layout",
    "key_map",
    "layout_names",
    "load_checkpoint",
    "module_layout",
    "module_paths",
    "recognises",
    "register_layout",
    "submodule",
    "to_state_dict",
    "unregister_layout",
]

#: What :func:`from_torch` returns as the config: the Non-local block's, or a family block's.
Config = NonLocalConfig | GCNetConfig | DNLConfig
_IGNORED_SUFFIXES = (".num_batches_tracked",)
_DTYPES = {"float64": torch.float64, "float32": torch.float32}
_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(NonLocalConfig))
_AMBIGUOUS = ("embedded_gaussian", "dot_product")


def _supported() -> str:
    return "\n".join(f"  - {name}: {lay.describe()}" for name, lay in LAYOUTS.items())


_CONFIGS = {"nonlocal": NonLocalConfig, "gcnet": GCNetConfig, "dnl": DNLConfig}


def param_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """nlref's parameter names and shapes of any block's config."""
    if isinstance(cfg, NonLocalConfig):
        return block_param_shapes(cfg)
    return family_param_shapes(cfg)


def _check_family(lay: Layout, cfg: Any) -> None:
    want = _CONFIGS[lay.family]
    if not isinstance(cfg, want):
        raise TypeError(
            f"layout {lay.name!r} describes a {lay.family} block, whose config is a "
            f"{want.__name__}; got a {type(cfg).__name__}"
        )


# --------------------------------------------------------------------------- key maps


def key_map(layout: str | Layout, cfg: Config) -> dict[str, str]:
    """nlref parameter name -> the layout's state_dict key, for every name of ``cfg``.

    >>> import nlref
    >>> from nlref import family
    >>> from nlref.interop.torch import key_map
    >>> key_map("mmcv", nlref.preset("mmcv", 8, sub_sample=True, dims=2))["g.weight"]
    'g.0.conv.weight'
    >>> key_map("timm-gc", family.GCNetConfig(16, fusion=("channel_mul",)))["channel_mul.norm.bias"]
    'mlp_scale.norm.bias'
    """
    lay = get_layout(layout)
    _check_family(lay, cfg)
    pooled = getattr(cfg, "sub_sample", None) is not None
    paths = lay.paths(pooled=pooled, norm=getattr(cfg, "norm", None) is not None)
    out = {}
    for name in param_shapes(cfg):
        layer, _, kind = name.rpartition(".")
        if not paths.get(layer):
            raise ValueError(f"layout {lay.name!r} has no place for nlref parameter {name!r}")
        out[name] = f"{paths[layer]}.{kind}"
    return out


def _needed_roles(lay: Layout) -> list[str]:
    """The roles a block in ``lay`` always has: g, W_z, and θ unless the layout's variants
    include the Gaussian (which compares x itself); none for a GCNet layout, which is
    recognised by the attributes it ``requires``."""
    if not lay.g:
        return []
    gaussian = lay.preset is not None and "gaussian" in presets.get(lay.preset).pairwise
    return ["g", "z"] + ([] if gaussian or not lay.theta else ["theta"])


def _keys_match(lay: Layout, keys: set[str]) -> bool:
    def has(role: str) -> bool:
        return any(f"{p}.weight" in keys for p in lay.candidate_paths(role))

    return all(has(role) for role in _needed_roles(lay))


def detect_layout(keys: Any) -> str:
    """The name of the registered layout whose keys ``keys`` (a state_dict or its keys) has.

    Raises
    ------
    ValueError
        If no layout matches; the message lists the registered layouts and some keys seen.
    """
    ks = set(keys)
    for name, lay in LAYOUTS.items():
        if lay.family == "nonlocal" and _keys_match(lay, ks):
            return name
    seen = sorted(ks)[:8]
    raise ValueError(
        f"cannot tell the layout of a state_dict with keys {seen}"
        f"{' ...' if len(ks) > 8 else ''}; supported layouts:\n{_supported()}\n"
        "pass layout=... (a name or a nlref.interop.torch.Layout), and prefix=... if the "
        "block sits inside a larger model"
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
    layout: str | Layout | None = None,
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
    layout : str or Layout, optional
        A registered name (:data:`LAYOUTS`) or a :class:`Layout`; detected from the keys
        when None (:func:`detect_layout`).
    prefix : str
        Read only the keys that start with ``prefix`` (a block inside a larger model, e.g.
        ``"backbone.layer3.1.nonlocal_block."``), with the prefix removed.
    dtype : {"float64", "float32", None}
        The dtype of the returned arrays; None keeps the checkpoint's (half precision
        becomes float32).
    **cfg_overrides
        :class:`nlref.NonLocalConfig` fields for what the keys cannot tell (they win over
        what is read). ``pairwise`` is required where the keys are ambiguous (the embedded
        Gaussian and the dot product have the same weights). The pool kernel of
        pytorchvideo is not in its keys: pass ``sub_sample=(1, 2, 2)`` (or ``True``) for a
        pooled block. mmcv's ``use_scale=False`` is ``scale=None``. A layout without a
        preset also needs ``scale=`` (and ``pool_order=`` when it pools).

    Returns
    -------
    cfg : NonLocalConfig
    params : dict
        nlref name -> NumPy array, the keys of :func:`nlref.param_shapes` (``cfg``).

    Raises
    ------
    ValueError
        For an unknown or undetectable layout, an ambiguous variant, a convention the
        layout cannot tell, or keys that do not match the config exactly (the message
        lists the missing and unexpected keys).
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
    _check_dtype(dtype)
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
    lay = get_layout(detect_layout(sd) if layout is None else layout)
    if lay.family != "nonlocal":
        raise ValueError(
            f"from_state_dict reads Non-local blocks; the keys of a {lay.family} block "
            f"({lay.name!r}) do not tell its config: read the module with from_torch"
        )
    cfg = _infer_config(lay, sd, cfg_overrides)
    return cfg, _convert(lay, cfg, sd, dtype)


def _infer_config(
    lay: Layout, sd: Mapping[str, Any], overrides: Mapping[str, Any]
) -> NonLocalConfig:
    unknown = sorted(set(overrides) - set(_CONFIG_FIELDS) - {"in_channels"})
    unknown += sorted(set(dict(lay.config)) - set(_CONFIG_FIELDS) - {"in_channels"})
    if unknown:
        raise TypeError(
            f"unexpected config override(s) {unknown}; expected NonLocalConfig fields "
            f"{list(_CONFIG_FIELDS[1:])}"
        )
    pooled_g = dict(lay.pooled).get("g")
    if pooled_g and f"{pooled_g}.weight" in sd:
        pooled: bool | None = True
    elif f"{lay.g}.weight" in sd:
        pooled = False if pooled_g else None  # None: the keys do not tell
    else:
        keys = [f"{p}.weight" for p in lay.candidate_paths("g")]
        raise ValueError(f"expected one of the keys {keys}; got {sorted(sd)[:10]}")
    g_weight = sd[f"{pooled_g if pooled else lay.g}.weight"]
    shape = tuple(g_weight.shape)
    if lay.kind == "conv" and len(shape) < 3:
        raise ValueError(
            f"expected the g projection to be a conv weight (C′, C, 1[, 1[, 1]]), got {shape}"
        )
    if lay.kind == "linear" and len(shape) != 2:
        raise ValueError(f"expected the g projection to be a linear weight (C′, C), got {shape}")
    dims = len(shape) - 2 if lay.kind == "conv" else None
    inter, in_channels = int(shape[0]), int(shape[1])
    paths = lay.paths(pooled=bool(pooled), norm=True)
    found: dict[str, Any] = {"inter_channels": inter}
    if paths["concat"] and f"{paths['concat']}.weight" in sd:
        found["pairwise"] = "concatenation"
    elif not paths["theta"] or f"{paths['theta']}.weight" not in sd:
        found["pairwise"] = "gaussian"
    if pooled is not None:
        found["sub_sample"] = True if pooled else None
    found["norm"] = "batchnorm" if paths["bn"] and f"{paths['bn']}.weight" in sd else None
    values = {**dict(lay.config), **found, **overrides}

    if "pairwise" not in values:
        options = presets.get(lay.preset).pairwise if lay.preset else _AMBIGUOUS
        if len(options) > 1:
            raise ValueError(
                f"the {lay.name} state_dict keys cannot tell the variant apart (the embedded "
                f"Gaussian and the dot product have the same weights); pass pairwise=, one "
                f"of {tuple(v for v in options if v in _AMBIGUOUS)}"
            )
    if lay.preset is not None:
        return presets.preset(lay.preset, in_channels, dims=dims, **values)
    return _custom_config(lay, sd, in_channels, dims, values)


def _custom_config(
    lay: Layout, sd: Mapping[str, Any], in_channels: int, dims: int | None, values: dict
) -> NonLocalConfig:
    """The config of a layout without a preset: every convention read or given."""
    pairwise = values["pairwise"]
    if "scale" not in values and get_pairwise(pairwise).uses_scale:
        raise ValueError(
            f"layout {lay.name!r} has no preset, so nlref cannot tell the logit scale of this "
            f"{pairwise} block; pass scale= (None for 1, or e.g. 1/√C′ = "
            f"{values['inter_channels'] ** -0.5:.4g}, 1/√C = {in_channels**-0.5:.4g})"
        )
    sub_sample = values.get("sub_sample")
    if sub_sample is True:
        raise ValueError(
            f"layout {lay.name!r} has no preset to take the pool kernel from; pass "
            "sub_sample=<kernel per spatial dim>, e.g. (2, 2)"
        )
    if sub_sample is False:
        sub_sample = None
    if sub_sample is not None and "pool_order" not in values:
        if lay.pool_order is None:
            raise ValueError(
                f"layout {lay.name!r} declares no pool order; pass pool_order="
                "'after_projection' (φ = P(W_φ x), as in the paper) or 'before_projection' "
                "(φ = W_φ P(x), as in Caffe2 and pytorchvideo)"
            )
        values["pool_order"] = lay.pool_order
    if sub_sample is not None and dims is not None and len(tuple(sub_sample)) != dims:
        raise ValueError(
            f"sub_sample={sub_sample!r} has {len(tuple(sub_sample))} entries but the weights "
            f"are {dims}-D"
        )
    values["sub_sample"] = sub_sample
    if "biases" not in values:
        paths = lay.paths(pooled=sub_sample is not None, norm=values.get("norm") is not None)
        values["biases"] = _biases(paths, sd)
    return NonLocalConfig(in_channels=in_channels, **values)


def _biases(paths: Mapping[str, str | None], sd: Mapping[str, Any]) -> tuple[str, ...]:
    """The layers whose key has a bias, read from the state_dict."""
    return tuple(r for r in BIAS_LAYERS if paths[r] and f"{paths[r]}.bias" in sd)


def _check_dtype(dtype: str | None) -> None:
    if dtype not in (None, *_DTYPES):
        raise ValueError(f"dtype must be 'float64', 'float32' or None, got {dtype!r}")


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
    lay: Layout, cfg: Config, sd: Mapping[str, Any], dtype: str | None
) -> dict[str, np.ndarray]:
    kmap = key_map(lay, cfg)
    expected, present = set(kmap.values()), set(sd)
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        parts = [f"missing {missing}"] if missing else []
        parts += [f"unexpected {unexpected}"] if unexpected else []
        if isinstance(cfg, GCNetConfig):
            fields = f"pooling={cfg.pooling!r}, fusion={cfg.fusion}"
            hint = "pooling=, fusion="
        else:
            variant = f"pairwise={cfg.pairwise!r}, " if isinstance(cfg, NonLocalConfig) else ""
            fields = f"{variant}sub_sample={cfg.sub_sample}, norm={cfg.norm!r}, biases={cfg.biases}"
            hint = ("pairwise=, " if variant else "") + "sub_sample=, norm=, biases="
        raise ValueError(
            f"the {lay.name} state_dict does not match the config ({fields}): "
            + "; ".join(parts)
            + f". Pass the overrides that match the checkpoint ({hint})"
        )
    shapes = param_shapes(cfg)
    params = {}
    for name, key in kmap.items():
        a = _to_numpy(sd[key], dtype)
        want = shapes[name]
        if name == "concat.weight":  # (1, 2C', 1, 1) conv or (1, 2C') linear -> (2C',)
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
    layout: str | Layout,
    *,
    dims: int | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The inverse of :func:`from_state_dict`: nlref params as a ``layout`` state_dict.

    Conv weights get their trailing 1×1(×1) dims back (``dims`` of them, required for a
    conv layout; the concatenation projection is always a 2-D conv, as in mmcv and
    AlexHex7), and BN gets a ``num_batches_tracked`` of 0, so that
    ``module.load_state_dict(...)`` accepts it.
    """
    lay = get_layout(layout)
    if lay.family != "nonlocal":
        raise ValueError(
            f"to_state_dict writes Non-local blocks; for a {lay.family} layout ({lay.name!r}) "
            "copy the parameters into the module by key_map(layout, cfg)"
        )
    if lay.kind == "conv" and dims not in (1, 2, 3):
        raise ValueError(f"dims must be 1, 2 or 3, got {dims!r}")
    out: dict[str, torch.Tensor] = {}
    for name, key in key_map(lay, cfg).items():
        t = torch.as_tensor(np.asarray(params[name]))
        if dtype is not None:
            t = t.to(dtype)
        if name == "concat.weight":
            t = t.reshape(1, -1, 1, 1) if lay.kind == "conv" else t.reshape(1, -1)
        elif name.endswith(".weight") and not name.startswith("bn.") and lay.kind == "conv":
            t = t.reshape(*t.shape, *([1] * dims))
        out[key] = t.clone()
    if cfg.norm is not None:
        bn = lay.paths(pooled=cfg.sub_sample is not None, norm=True)["bn"]
        out[f"{bn}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return out


# --------------------------------------------------------------------------- modules


def submodule(module: nn.Module, path: str | None) -> nn.Module | None:
    """The sub-module at the dotted ``path``, or None where there is none (or it is None)."""
    if not path:
        return None
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _has_weight(module: nn.Module | None) -> bool:
    return module is not None and isinstance(getattr(module, "weight", None), torch.Tensor)


def recognises(module: nn.Module, layout: str | Layout) -> bool:
    """Whether ``module`` has the parts of ``layout``: the attributes it ``requires``, and
    sub-modules at the paths of g, W_z (and θ unless the layout allows the Gaussian)."""
    lay = get_layout(layout)
    if not all(hasattr(module, a) for a in lay.requires):
        return False

    def has(role: str) -> bool:
        return any(submodule(module, p) is not None for p in lay.candidate_paths(role))

    return all(has(role) for role in _needed_roles(lay))


def recognised_layout(module: nn.Module, candidates: Iterable[Layout]) -> Layout | None:
    """The layout among ``candidates`` that ``module`` has, or None. Where several fit, the
    one that ``requires`` the most attributes wins (mmsegmentation's DNL is a subclass of
    mmcv's ``NonLocal2d``, with its parts and a ``temperature``), then the first."""
    fitting = [lay for lay in candidates if recognises(module, lay)]
    if not fitting:
        return None
    return max(fitting, key=lambda lay: len(lay.requires))  # max keeps the first of ties


def module_layout(module: nn.Module, layouts: Iterable[str | Layout] | None = None) -> Layout:
    """The layout of a PyTorch Non-local module (or one of its family), recognised from its
    sub-modules and attributes.

    Parameters
    ----------
    module : torch.nn.Module
    layouts : iterable of str or Layout, optional
        The layouts to try. Default: every registered layout.

    Raises
    ------
    TypeError
        If it is in none of them; the message lists them and says how to describe a
        layout of your own.
    """
    candidates = list(LAYOUTS.values()) if layouts is None else [get_layout(x) for x in layouts]
    lay = recognised_layout(module, candidates)
    if lay is not None:
        return lay
    cls = type(module)
    raise TypeError(
        f"nlref does not recognise {cls.__module__}.{cls.__qualname__} as a Non-local "
        f"block; supported layouts:\n{_supported()}\n"
        "describe your own with layout=nlref.interop.torch.Layout(theta=..., phi=..., g=..., "
        "z=..., bn=...), naming the sub-modules that hold each projection"
    )


def _kernel_tuple(value: Any, dims: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dims
    return tuple(int(v) for v in value)


_POOLS = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}


def _pool_kernel(pool: nn.Module, dims: int | None, where: str) -> tuple[int, ...]:
    pool_dims = _POOLS.get(type(pool))
    if pool_dims is None or (dims is not None and pool_dims != dims):
        raise ValueError(f"{where} is {pool!r}; nlref sub-samples with a max-pool")
    kernel = _kernel_tuple(pool.kernel_size, pool_dims)
    stride = kernel if pool.stride is None else _kernel_tuple(pool.stride, pool_dims)
    plain = (
        stride == kernel
        and _kernel_tuple(pool.padding, pool_dims) == (0,) * pool_dims
        and _kernel_tuple(pool.dilation, pool_dims) == (1,) * pool_dims
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


def module_paths(module: nn.Module, layout: Layout) -> dict[str, str | None]:
    """Role -> dotted path in this module: the layout's paths for whether it pools and has
    a norm, as read from its sub-modules."""
    pool_path = dict(layout.pooled).get("pool") or layout.pool
    pooled = submodule(module, pool_path) is not None
    norm = submodule(module, layout.paths(pooled=pooled, norm=True)["bn"]) is not None
    return layout.paths(pooled=pooled, norm=norm)


def _module_facts(module: nn.Module, lay: Layout) -> dict[str, Any]:
    """What the module's structure and declared attributes tell about its config."""
    paths = module_paths(module, lay)
    g = submodule(module, paths["g"])
    if not _has_weight(g):
        raise ValueError(
            f"layout {lay.name!r} places g at {paths['g']!r}, but {type(module).__name__} "
            "has no layer with a weight there"
        )
    dims = g.weight.dim() - 2 if lay.kind == "conv" else None
    found: dict[str, Any] = {}
    pool = submodule(module, paths["pool"])
    if pool is not None:
        found["sub_sample"] = _pool_kernel(pool, dims, paths["pool"])
        if lay.pool_order is not None:
            found["pool_order"] = lay.pool_order
    elif lay.pool or dict(lay.pooled).get("pool"):  # the layout pools; this module does not
        found["sub_sample"] = None
    if _has_weight(submodule(module, paths["concat"])):
        found["pairwise"] = "concatenation"
    elif not _has_weight(submodule(module, paths["theta"])):
        found["pairwise"] = "gaussian"
    bn = submodule(module, paths["bn"])
    if bn is not None:
        found.update(_bn_settings(bn, paths["bn"]))
    if lay.read is not None:
        found.update(lay.read(module))
    return found


def from_torch(
    module: nn.Module,
    *,
    layout: str | Layout | None = None,
    dtype: str | None = "float64",
    **cfg_overrides: Any,
) -> tuple[Config, dict[str, np.ndarray]]:
    """The nlref config and parameters of a PyTorch Non-local module, or of a block of its
    family.

    Parameters
    ----------
    module : torch.nn.Module
        A block in a registered layout (an mmcv ``NonLocal1d/2d/3d``, a timm
        ``NonLocalAttn``, a pytorchvideo ``NonLocal``, an AlexHex7 ``_NonLocalBlockND``; an
        mmcv ``ContextBlock``, a timm ``GlobalContext``, an mmsegmentation
        ``DisentangledNonLocal2d``), or in the ``layout`` you describe.
    layout : str or Layout, optional
        A registered name or a :class:`Layout`, instead of recognising the module.
    dtype : {"float64", "float32", None}
        Of the returned arrays (None keeps the module's).
    **cfg_overrides
        Fields of the block's config; they win over what is read from the module
        (``pairwise=`` for a block whose variant the layout cannot tell, ``scale=`` for a
        layout without a preset).

    Returns
    -------
    cfg : NonLocalConfig, GCNetConfig or DNLConfig
        By the layout's ``family``.
    params : dict
        nlref name -> NumPy array.

    Raises
    ------
    TypeError
        If ``module`` is not a recognised Non-local block; the message lists the layouts.
    ValueError
        If it uses something nlref does not model (a norm other than batch norm, a pool
        other than a plain max-pool, a conv that is not 1×1), or a convention neither the
        module nor the layout tells is not given.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    lay = module_layout(module) if layout is None else get_layout(layout)
    if lay.kind == "conv":
        _check_convs(module)
    if lay.family == "gcnet":
        cfg = _gcnet_config(module, lay, cfg_overrides)
    elif lay.family == "dnl":
        cfg = _dnl_config(module, lay, cfg_overrides)
    else:
        overrides = {**_module_facts(module, lay), **cfg_overrides}
        return from_state_dict(module.state_dict(), lay, dtype=dtype, **overrides)
    _check_dtype(dtype)
    sd = {k: v for k, v in module.state_dict().items() if not k.endswith(_IGNORED_SUFFIXES)}
    return cfg, _convert(lay, cfg, sd, dtype)


# --------------------------------------------------------------------------- the family


def _config(kind: type, values: Mapping[str, Any], lay: Layout) -> Any:
    fields = {f.name for f in dataclasses.fields(kind) if f.init}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise TypeError(
            f"unexpected config override(s) {unknown} for the {lay.family} layout "
            f"{lay.name!r}; expected {kind.__name__} fields {sorted(fields)}"
        )
    return kind(**values)


def _behaves_as(module: nn.Module, path: str, fn: Any, what: str) -> None:
    """The weightless layer at ``path`` (if the module has one) computes ``fn``."""
    layer = submodule(module, path)
    if layer is None:
        return
    probe = torch.linspace(-4.0, 4.0, 17, dtype=torch.float64).reshape(1, 17, 1, 1)
    same = not any(True for _ in layer.parameters())  # ReLU and σ have no weights
    if same:
        try:
            with torch.no_grad():
                got = layer(probe.clone())
            same = torch.allclose(got, fn(probe), rtol=0, atol=1e-12)
        except Exception:
            same = False
    if not same:
        raise ValueError(
            f"layer {path!r} is {layer!r}, which does not compute {what}; nlref's GCNet uses {what}"
        )


def _gcnet_config(module: nn.Module, lay: Layout, overrides: Mapping[str, Any]) -> GCNetConfig:
    """GCNet's config from the module: the pooling from its mask's presence, the fusions
    from the transforms present, C and C′ from the first projection, ε from the layer
    norm; ReLU and the gate checked where the layout places them."""
    paths = lay.paths(pooled=False, norm=True)
    fusion = tuple(f for f in FUSIONS if _has_weight(submodule(module, paths.get(f"{f}.fc1"))))
    if not fusion:
        raise ValueError(
            f"layout {lay.name!r}: {type(module).__name__} has no transform at "
            f"{[paths.get(f'{f}.fc1') for f in FUSIONS]}"
        )
    fc1 = submodule(module, paths[f"{fusion[0]}.fc1"])
    values: dict[str, Any] = {
        "in_channels": int(fc1.weight.shape[1]),
        "inter_channels": int(fc1.weight.shape[0]),
        "pooling": "att" if _has_weight(submodule(module, paths.get("mask"))) else "avg",
        "fusion": fusion,
    }
    norm = submodule(module, paths.get(f"{fusion[0]}.norm"))
    if not isinstance(norm, nn.LayerNorm) or not norm.elementwise_affine:
        raise ValueError(
            f"layer {paths.get(f'{fusion[0]}.norm')!r} is {norm!r}; nlref's GCNet transform "
            "has an affine layer norm over its C′ channels"
        )
    values["ln_eps"] = float(norm.eps)
    for f in fusion:
        _behaves_as(module, paths.get(f"{f}.relu") or "", torch.relu, "ReLU")
    if "channel_mul" in fusion:
        _behaves_as(module, paths.get("gate") or "", torch.sigmoid, "the sigmoid")
    if lay.read is not None:
        values.update(lay.read(module))
    return _config(GCNetConfig, {**dict(lay.config), **values, **overrides}, lay)


def _dnl_config(module: nn.Module, lay: Layout, overrides: Mapping[str, Any]) -> DNLConfig:
    """DNL's config from the module: the Non-local block's structure (pool, BN, biases from
    the weights), and what the layout's ``read`` tells (mmsegmentation's scale and
    temperature)."""
    found = _module_facts(module, lay)
    if found.pop("pairwise", "embedded_gaussian") != "embedded_gaussian":
        raise ValueError(f"layout {lay.name!r}: a disentangled block has θ and φ projections")
    if found.get("sub_sample") is not None and "pool_order" not in found:
        raise ValueError(f"layout {lay.name!r} pools but declares no pool_order")
    paths = module_paths(module, lay)
    g = submodule(module, paths["g"]).weight
    sd = module.state_dict()
    found["inter_channels"], found["in_channels"] = int(g.shape[0]), int(g.shape[1])
    found["norm"] = "batchnorm" if submodule(module, paths["bn"]) is not None else None
    found["biases"] = _biases(paths, sd)
    return _config(DNLConfig, {**dict(lay.config), **found, **overrides}, lay)
