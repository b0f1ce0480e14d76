r"""Where a module keeps each part of a block: :class:`Layout`, and the table of them.

A :class:`Layout` names, as dotted paths of sub-modules, the layers of a block. For a
Non-local block these are the projections θ, φ and g, the output projection W_z, the
batch norm after it, the concatenation weight, and the key-side max-pool; it also says
whether the projections are 1×1(×1) convs or ``nn.Linear`` layers on channels-last tokens,
and which attributes of the module tell what the weights cannot (the variant, the logit
scale). The Non-local block's successors (:mod:`nlref.family`) are layouts too: their
layers are named by nlref's parameter prefixes (``layers=``), and ``family=`` says which
block they are. Everything that reads or writes a PyTorch block
(:func:`nlref.interop.torch.from_torch`, ``from_state_dict``, ``to_state_dict``,
:func:`nlref.testing.compare`, ``check_model``, ``nlref compare``) works from a layout,
given by its registered name or as a ``Layout`` value.

The public implementations are the rows of :data:`LAYOUTS`: four Non-local blocks (mmcv,
timm, pytorchvideo, AlexHex7), GCNet's global context block in mmcv (``mmcv-gc``) and timm
(``timm-gc``), and mmsegmentation's disentangled non-local block (``dnl``);
:func:`register_layout` adds one. This module does not import torch.

>>> from nlref.interop.layouts import LAYOUTS, Layout
>>> tuple(LAYOUTS)
('mmcv', 'timm', 'pytorchvideo', 'alexhex7', 'mmcv-gc', 'timm-gc', 'dnl')
>>> LAYOUTS["timm"].paths(pooled=False, norm=True)["theta"]
't'
>>> LAYOUTS["mmcv-gc"].paths(pooled=False, norm=True)["channel_add.fc2"]
'channel_add_conv.3'
>>> mine = Layout(theta="query_conv", phi="key_conv", g="value_conv", z="out_conv",
...               bn="out_bn")
>>> mine.name
'custom'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import POOL_ORDERS

__all__ = [
    "FAMILIES",
    "KINDS",
    "LAYOUTS",
    "ROLES",
    "Layout",
    "get_layout",
    "layout_names",
    "mmseg_scale",
    "register_layout",
    "unregister_layout",
]

#: The parts of a block a layout places. ``pool`` is the key-side max-pool and ``values``
#: the sub-module whose output is g (B, C′, N′), for the oracle's probe.
ROLES = ("theta", "phi", "g", "concat", "z", "bn", "pool", "values")
#: How the projections are stored: 1×1(×1) convs, or ``nn.Linear`` on channels-last tokens.
KINDS = ("conv", "linear")
#: The block families a layout can describe: the Non-local block, GCNet's global context
#: block and the disentangled non-local block (:mod:`nlref.family`).
FAMILIES = ("nonlocal", "gcnet", "dnl")


def _pairs(
    value: Mapping[str, str] | Iterable[tuple[str, str]] | None, known: tuple[str, ...] = ROLES
) -> tuple:
    items = dict(value or {})
    unknown = sorted(set(items) - set(known))
    if unknown:
        raise ValueError(f"unknown layout role(s) {unknown}; the roles are {known}")
    return tuple(sorted(items.items()))


@dataclass(frozen=True, kw_only=True)
class Layout:
    """Where a PyTorch module keeps each part of a Non-local block (or of a block of its
    family).

    Parameters
    ----------
    theta, phi, g, z : str
        Dotted paths of the sub-modules holding the projections W_θ, W_φ, W_g and W_z
        (each with a ``weight`` and optionally a ``bias``). ``g`` and ``z`` are required
        for a Non-local block; θ and φ are absent in the Gaussian variant, which compares
        x itself.
    bn : str, optional
        The batch norm after W_z. A module without it has ``norm=None``.
    concat : str, optional
        The concatenation's projection w_f (a (1, 2C′) weight, conv or linear).
    pool : str, optional
        The key-side max-pool (kernel = stride). Its kernel is read from the module.
    pool_order : {"after_projection", "before_projection"}, optional
        Where ``pool`` sits: on the projections' outputs (the paper, mmcv, AlexHex7) or on
        x before the φ and g projections (Caffe2, pytorchvideo).
    kind : {"conv", "linear"}
        1×1(×1) conv weights (C_out, C_in, 1, ...), or ``nn.Linear`` weights (C_out, C_in)
        applied to channels-last tokens.
    channels_last : bool
        The module takes and returns (B, \\*S, C) instead of (B, C, \\*S).
    values : str, optional
        A sub-module whose output is g (B, C′, N′), after any pooling, for the oracle to
        compare. Default: ``g`` when the block has no pool after its projections.
    attention : str, optional
        A sub-module or method whose output is the attention A (B, N, N′). ``"{mode}"``
        is filled in from the module's attributes (mmcv calls ``getattr(self, self.mode)``).
    attention_kwarg : str, optional
        A keyword of ``forward`` that makes it return ``(z, A)`` (AlexHex7's
        ``return_nl_map``).
    pooled : mapping, optional
        Role (or ``layers`` name) -> path where the path differs when the block pools
        (mmcv keeps the pooled g projection at ``g.0.conv`` and the pool at ``g.1``).
    without_norm : mapping, optional
        Role -> path where the path differs without a batch norm (AlexHex7: ``W``).
    requires : tuple of str
        Attributes a module must have to be recognised as this layout.
    config : mapping, optional
        Config values every block in this layout has (``{"pairwise":
        "embedded_gaussian", "scale": None}``): what the weights cannot tell, given once
        for the layout. What the module's structure and attributes tell, and the
        overrides of a call, win over it.
    preset : str, optional
        The :func:`nlref.preset` whose conventions fill in what neither the weights nor
        the attributes tell (C′ rule, scale, pool kernel, biases). Without one, the biases
        are read from the weights, and the variant (when θ and φ exist and there is no
        concatenation weight), the scale, and the pool order (when there is a pool) must
        be passed as ``pairwise=``, ``scale=`` and ``pool_order=``.
    read : callable, optional
        ``read(module) -> dict`` of config values taken from the module's attributes
        (mmcv's ``mode`` and ``use_scale``, timm's ``scale``).
    family : {"nonlocal", "gcnet", "dnl"}
        The block: the Non-local block (:class:`nlref.NonLocalConfig`), GCNet's global
        context block (:class:`nlref.family.GCNetConfig`) or the disentangled non-local
        block (:class:`nlref.family.DNLConfig`).
    layers : mapping, optional
        nlref parameter prefix -> path, for the layers the roles above do not name:
        GCNet's ``mask`` (w_k), ``channel_add.fc1``, ``channel_add.norm``,
        ``channel_add.fc2`` (and the same for ``channel_mul``), DNL's ``mask`` (w_m). A
        GCNet layout may also place ``<fusion>.relu`` and ``gate``: modules without
        weights that the reader checks compute ReLU and the sigmoid.
    probes : mapping, optional
        Row name -> a sub-module or method whose output the oracle compares, for a family
        block (``{"attention": "softmax", "context": "spatial_pool"}`` in mmcv's
        ``ContextBlock``).
    name : str
        Shown in reports; :func:`register_layout` sets it.
    description : str
        One line for error messages and the docs.
    """

    theta: str | None = None
    phi: str | None = None
    g: str = ""
    z: str = ""
    bn: str | None = None
    concat: str | None = None
    pool: str | None = None
    pool_order: str | None = None
    kind: str = "conv"
    channels_last: bool = False
    values: str | None = None
    attention: str | None = None
    attention_kwarg: str | None = None
    pooled: Any = field(default_factory=tuple)
    without_norm: Any = field(default_factory=tuple)
    requires: tuple[str, ...] = ()
    config: Any = field(default_factory=tuple)
    preset: str | None = None
    read: Callable[[Any], dict[str, Any]] | None = field(default=None, compare=False)
    family: str = "nonlocal"
    layers: Any = field(default_factory=tuple)
    probes: Any = field(default_factory=tuple)
    name: str = "custom"
    description: str = ""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"Layout family must be one of {FAMILIES}, got {self.family!r}")
        layers = dict(self.layers or {})
        if any(not isinstance(p, str) or not p for p in layers.values()):
            raise TypeError(f"Layout layers= must map names to dotted paths, got {layers!r}")
        object.__setattr__(self, "layers", tuple(sorted(layers.items())))
        object.__setattr__(self, "probes", tuple(sorted(dict(self.probes or {}).items())))
        if self.family == "gcnet" and not layers:
            raise ValueError("a gcnet Layout needs layers= (nlref's layer names -> paths)")
        if self.family == "dnl" and "mask" not in layers:
            raise ValueError("a dnl Layout needs layers={'mask': path of the unary projection}")
        for role in ("g", "z"):
            if self.family == "gcnet" and not getattr(self, role):
                continue
            if not isinstance(getattr(self, role), str) or not getattr(self, role):
                raise ValueError(
                    f"Layout needs {role}= (the dotted path of the sub-module holding W_{role})"
                )
        for role in ("theta", "phi", "bn", "concat", "pool", "values", "attention"):
            value = getattr(self, role)
            if value is not None and (not isinstance(value, str) or not value):
                raise TypeError(
                    f"Layout {role}= must be a dotted path (str) or None, got {value!r}"
                )
        if self.kind not in KINDS:
            raise ValueError(f"Layout kind must be one of {KINDS}, got {self.kind!r}")
        if self.pool_order is not None and self.pool_order not in POOL_ORDERS:
            raise ValueError(
                f"Layout pool_order must be one of {POOL_ORDERS} or None, got {self.pool_order!r}"
            )
        known = ROLES + tuple(layers)
        object.__setattr__(self, "pooled", _pairs(self.pooled, known))
        object.__setattr__(self, "without_norm", _pairs(self.without_norm, known))
        object.__setattr__(self, "requires", tuple(self.requires))
        object.__setattr__(self, "config", tuple(sorted(dict(self.config or {}).items())))
        if self.preset is not None:
            from ..presets import get as get_preset

            get_preset(self.preset)  # raises for an unknown preset

    def paths(self, *, pooled: bool, norm: bool) -> dict[str, str | None]:
        """Role (and ``layers`` name) -> dotted path, for a block that pools (or not) and
        has a norm (or not)."""
        out: dict[str, str | None] = {role: getattr(self, role) for role in ROLES}
        out.update(dict(self.layers))
        if pooled:
            out.update(dict(self.pooled))
        if not norm:
            out.update(dict(self.without_norm))
            out["bn"] = None
        if out["values"] is None and not (pooled and self._pools_after()):
            out["values"] = out["g"]
        return out

    def _pools_after(self) -> bool:
        return self.pool_order != "before_projection"

    def candidate_paths(self, role: str) -> tuple[str, ...]:
        """Every path ``role`` can have in this layout (pooled or not, with or without norm)."""
        found = [
            getattr(self, role, None) if role in ROLES else dict(self.layers).get(role),
            dict(self.pooled).get(role),
            dict(self.without_norm).get(role),
        ]
        return tuple(dict.fromkeys(p for p in found if p))

    def describe(self) -> str:
        """One line: the description, or the paths of the roles this layout places."""
        if self.description:
            return self.description
        parts = [f"{r}={getattr(self, r)}" for r in ROLES if getattr(self, r)]
        parts += [f"{r}={p}" for r, p in self.layers]
        block = "" if self.family == "nonlocal" else f"{self.family} "
        return f"{block}{self.kind} layout: " + ", ".join(parts)

    def replace(self, **changes: Any) -> Layout:
        """A copy with ``changes`` (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------- attributes


def _check_mmcv_conv_out(module: Any) -> None:
    if getattr(module.conv_out, "with_activation", False):
        raise ValueError("mmcv conv_out has an activation; nlref's W_z has none")
    norm = getattr(module.conv_out, "norm", None) if module.conv_out.with_norm else None
    if norm is not None and "BatchNorm" not in type(norm).__name__:
        raise ValueError(f"conv_out.norm is {norm!r}; nlref's only norm is batch norm")


def _read_mmcv(module: Any) -> dict[str, Any]:
    found: dict[str, Any] = {"pairwise": module.mode}
    if module.mode == "embedded_gaussian" and not getattr(module, "use_scale", True):
        found["scale"] = None
    _check_mmcv_conv_out(module)
    return found


def mmseg_scale(inter_channels: int, use_scale: bool, temperature: float) -> dict[str, Any]:
    """The ``scale`` and ``temperature`` of a :class:`nlref.family.DNLConfig` that reproduce
    mmsegmentation's ``DisentangledNonLocal2d`` exactly, as keyword arguments.

    mmsegmentation divides the logits by ``torch.tensor(C′, dtype=torch.float) ** 0.5``
    (``use_scale``) and by ``torch.tensor(temperature)``: float32 numbers, even in a float64
    module. Its factor is therefore 1 / (fl₃₂(√C′) · fl₃₂(τ)), not 1 / (√C′ τ); the two
    differ by about 1e-8 relative, which moves z by about 1e-9. This returns
    ``scale = 1 / fl₃₂(√C′)`` (None without ``use_scale``) and ``temperature = fl₃₂(τ)``.
    fl₃₂(√C′) is the correctly rounded float32 square root, which equals PyTorch's float32
    power on the CPU for every C′ < 3678.

    >>> mmseg_scale(4, True, 0.05)["temperature"]
    0.05000000074505806
    """
    root = np.sqrt(np.float32(inter_channels))  # float32 in, float32 out, correctly rounded
    return {
        "scale": 1.0 / float(root) if use_scale else None,
        "temperature": float(np.float32(temperature)),
    }


def _read_mmseg_dnl(module: Any) -> dict[str, Any]:
    if module.mode != "embedded_gaussian":
        raise ValueError(
            f"DisentangledNonLocal2d with mode={module.mode!r}: nlref's disentangled block is "
            "the paper's, the embedded Gaussian (mmsegmentation's default)"
        )
    _check_mmcv_conv_out(module)
    return mmseg_scale(module.inter_channels, bool(module.use_scale), module.temperature)


def _read_timm(module: Any) -> dict[str, Any]:
    scale = float(module.scale)
    return {"scale": None if scale == 1.0 else scale}


def _read_pytorchvideo(module: Any) -> dict[str, Any]:
    from ..presets import get as get_preset

    return {"pairwise": get_preset("pytorchvideo").variant(module.instantiation)}


def _read_alexhex7(module: Any) -> dict[str, Any]:
    # AlexHex7 keeps each variant in its own file, non_local_<variant>.py, all with the
    # class _NonLocalBlockND: the file a class comes from (its __module__) names the variant
    origin = type(module).__module__.rsplit(".", 1)[-1]
    for name in ("embedded_gaussian", "dot_product"):
        if origin == f"non_local_{name}":
            return {"pairwise": name}
    return {}


def _gcnet_layers(mask: str, transforms: dict[str, str], steps: dict[str, str]) -> dict:
    """GCNet's layer names -> paths: the context's logits, and each transform's steps."""
    out = {"mask": mask}
    for fusion, prefix in transforms.items():
        out.update({f"{fusion}.{step}": f"{prefix}.{path}" for step, path in steps.items()})
    return out


#: The registered layouts, by name: the four public Non-local blocks first, then GCNet
#: (mmcv, timm) and the disentangled non-local block (mmsegmentation).
LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout(
            name="mmcv",
            description="mmcv NonLocal1d/2d/3d: g.conv.*, theta.conv.*, phi.conv.* (g.0.conv.*, "
            "phi.0.conv.* when sub-sampled), conv_out.conv.*, conv_out.bn.*, "
            "concat_project.conv.weight",
            theta="theta.conv",
            phi="phi.conv",
            g="g.conv",
            z="conv_out.conv",
            bn="conv_out.bn",
            concat="concat_project.conv",
            pooled={"phi": "phi.0.conv", "g": "g.0.conv", "pool": "g.1"},
            pool_order="after_projection",
            values="g",
            attention="{mode}",
            requires=("mode",),
            preset="mmcv",
            read=_read_mmcv,
        ),
        Layout(
            name="timm",
            description="timm NonLocalAttn: t.*, p.*, g.*, z.*, norm.*",
            theta="t",
            phi="p",
            g="g",
            z="z",
            bn="norm",
            values="g",
            requires=("scale",),
            preset="timm",
            read=_read_timm,
        ),
        Layout(
            name="pytorchvideo",
            description="pytorchvideo NonLocal / create_nonlocal: conv_theta.*, conv_phi.*, "
            "conv_g.*, conv_out.*, norm.*",
            theta="conv_theta",
            phi="conv_phi",
            g="conv_g",
            z="conv_out",
            bn="norm",
            pool="pool",
            pool_order="before_projection",
            values="conv_g",
            requires=("instantiation",),
            preset="pytorchvideo",
            read=_read_pytorchvideo,
        ),
        Layout(
            name="alexhex7",
            description="AlexHex7 _NonLocalBlockND: g.*, theta.*, phi.* (g.0.*, phi.0.* when "
            "sub-sampled), W.0.* + W.1.* (W.* without bn_layer), concat_project.0.weight",
            theta="theta",
            phi="phi",
            g="g",
            z="W.0",
            bn="W.1",
            concat="concat_project.0",
            pooled={"phi": "phi.0", "g": "g.0", "pool": "g.1"},
            without_norm={"z": "W"},
            pool_order="after_projection",
            values="g",
            attention_kwarg="return_nl_map",
            preset="alexhex7",
            read=_read_alexhex7,
        ),
        Layout(
            name="mmcv-gc",
            family="gcnet",
            description="mmcv ContextBlock (GCNet): conv_mask.*, channel_add_conv.{0,1,3}.*, "
            "channel_mul_conv.{0,1,3}.*",
            layers=_gcnet_layers(
                "conv_mask",
                {"channel_add": "channel_add_conv", "channel_mul": "channel_mul_conv"},
                {"fc1": "0", "norm": "1", "relu": "2", "fc2": "3"},
            ),
            probes={"attention": "softmax", "context": "spatial_pool"},
            requires=("pooling_type", "fusion_types"),
        ),
        Layout(
            name="timm-gc",
            family="gcnet",
            description="timm GlobalContext (GCNet): conv_attn.*, mlp_add.{fc1,norm,fc2}.*, "
            "mlp_scale.{fc1,norm,fc2}.*",
            layers={
                **_gcnet_layers(
                    "conv_attn",
                    {"channel_add": "mlp_add", "channel_mul": "mlp_scale"},
                    {"fc1": "fc1", "norm": "norm", "relu": "act", "fc2": "fc2"},
                ),
                "gate": "gate",
            },
            requires=("conv_attn", "mlp_add", "mlp_scale"),
        ),
        Layout(
            name="dnl",
            family="dnl",
            description="mmsegmentation DisentangledNonLocal2d: theta.conv.*, phi.conv.*, "
            "g.conv.*, conv_mask.*, conv_out.conv.*, conv_out.bn.*",
            theta="theta.conv",
            phi="phi.conv",
            g="g.conv",
            z="conv_out.conv",
            bn="conv_out.bn",
            layers={"mask": "conv_mask"},
            pooled={"phi": "phi.0.conv", "g": "g.0.conv", "pool": "g.1"},
            pool_order="after_projection",
            values="g",
            attention="embedded_gaussian",
            requires=("mode", "temperature"),
            read=_read_mmseg_dnl,
        ),
    )
}
_BUILTIN = tuple(LAYOUTS)


def layout_names() -> tuple[str, ...]:
    """The registered layout names, built-in ones first."""
    return tuple(LAYOUTS)


def register_layout(name: str, layout: Layout) -> Layout:
    """Register ``layout`` under ``name``, so that ``layout=name`` finds it and modules in it
    are recognised (after the built-in layouts). Returns the registered copy (its ``name``
    set).

    Raises
    ------
    ValueError
        If ``name`` is a built-in layout's, or is taken by a different layout.
    TypeError
        If ``layout`` is not a :class:`Layout`.
    """
    if not isinstance(layout, Layout):
        raise TypeError(f"register_layout needs a Layout, got {type(layout).__name__}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"a layout name must be a non-empty str, got {name!r}")
    if name in _BUILTIN:
        raise ValueError(f"{name!r} is a built-in layout and cannot be replaced")
    named = layout.replace(name=name)
    if name in LAYOUTS and LAYOUTS[name] != named:
        raise ValueError(f"a different layout named {name!r} is already registered")
    LAYOUTS[name] = named
    return named


def unregister_layout(name: str) -> None:
    """Remove a layout added by :func:`register_layout` (built-in ones stay)."""
    if name not in _BUILTIN:
        LAYOUTS.pop(name, None)


def get_layout(layout: str | Layout) -> Layout:
    """The :class:`Layout` of a registered name, or ``layout`` itself.

    Raises
    ------
    ValueError
        For an unknown name; the message lists the registered ones.
    TypeError
        For something that is neither a name nor a :class:`Layout`.
    """
    if isinstance(layout, Layout):
        return layout
    if isinstance(layout, str):
        if layout in LAYOUTS:
            return LAYOUTS[layout]
        raise ValueError(
            f"unknown layout {layout!r}; expected one of {layout_names()} or a "
            "nlref.interop.torch.Layout(...)"
        )
    raise TypeError(f"layout must be a registered name or a Layout, got {type(layout).__name__}")
