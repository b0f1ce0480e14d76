r"""Where a module keeps each part of a Non-local block: :class:`Layout`, and the table of them.

A :class:`Layout` names, as dotted paths of sub-modules, the layers of a block: the
projections θ, φ and g, the output projection W_z, the batch norm after it, the
concatenation weight, and the key-side max-pool. It also says whether the projections are
1×1(×1) convs or ``nn.Linear`` layers on channels-last tokens, and which attributes of the
module tell what the weights cannot (the variant, the logit scale). Everything that reads
or writes a PyTorch block (:func:`nlref.interop.torch.from_torch`, ``from_state_dict``,
``to_state_dict``, :func:`nlref.testing.compare`, ``check_model``, ``nlref compare``)
works from a layout, given by its registered name or as a ``Layout`` value.

The four public implementations are the rows of :data:`LAYOUTS`; :func:`register_layout`
adds one. This module does not import torch.

>>> from nlref.interop.layouts import LAYOUTS, Layout
>>> tuple(LAYOUTS)
('mmcv', 'timm', 'pytorchvideo', 'alexhex7')
>>> LAYOUTS["timm"].paths(pooled=False, norm=True)["theta"]
't'
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

from ..config import POOL_ORDERS

__all__ = [
    "KINDS",
    "LAYOUTS",
    "ROLES",
    "Layout",
    "get_layout",
    "layout_names",
    "register_layout",
    "unregister_layout",
]

#: The parts of a block a layout places. ``pool`` is the key-side max-pool and ``values``
#: the sub-module whose output is g (B, C′, N′), for the oracle's probe.
ROLES = ("theta", "phi", "g", "concat", "z", "bn", "pool", "values")
#: How the projections are stored: 1×1(×1) convs, or ``nn.Linear`` on channels-last tokens.
KINDS = ("conv", "linear")
#: The layer of each nlref parameter prefix (``"theta.weight"`` lives in the θ layer).
PARAM_ROLES = ("theta", "phi", "g", "concat", "z", "bn")


def _pairs(value: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> tuple:
    items = dict(value or {})
    unknown = sorted(set(items) - set(ROLES))
    if unknown:
        raise ValueError(f"unknown layout role(s) {unknown}; the roles are {ROLES}")
    return tuple(sorted(items.items()))


@dataclass(frozen=True, kw_only=True)
class Layout:
    """Where a PyTorch module keeps each part of a Non-local block.

    Parameters
    ----------
    theta, phi, g, z : str
        Dotted paths of the sub-modules holding the projections W_θ, W_φ, W_g and W_z
        (each with a ``weight`` and optionally a ``bias``). ``g`` and ``z`` are required;
        θ and φ are absent in the Gaussian variant, which compares x itself.
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
        Role -> path where the path differs when the block pools (mmcv keeps the
        pooled g projection at ``g.0.conv`` and the pool at ``g.1``).
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
    family : str
        The block family the oracle compares (``"nonlocal"``).
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
    name: str = "custom"
    description: str = ""

    def __post_init__(self) -> None:
        for role in ("g", "z"):
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
            raise ValueError(f"Layout pool_order must be one of {POOL_ORDERS} or None")
        object.__setattr__(self, "pooled", _pairs(self.pooled))
        object.__setattr__(self, "without_norm", _pairs(self.without_norm))
        object.__setattr__(self, "requires", tuple(self.requires))
        object.__setattr__(self, "config", tuple(sorted(dict(self.config or {}).items())))
        if self.preset is not None:
            from ..presets import get as get_preset

            get_preset(self.preset)  # raises for an unknown preset

    def paths(self, *, pooled: bool, norm: bool) -> dict[str, str | None]:
        """Role -> dotted path, for a block that pools (or not) and has a norm (or not)."""
        out: dict[str, str | None] = {role: getattr(self, role) for role in ROLES}
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
            getattr(self, role),
            dict(self.pooled).get(role),
            dict(self.without_norm).get(role),
        ]
        return tuple(dict.fromkeys(p for p in found if p))

    def describe(self) -> str:
        """One line: the description, or the paths of the roles this layout places."""
        if self.description:
            return self.description
        parts = [f"{r}={getattr(self, r)}" for r in ROLES if getattr(self, r)]
        return f"{self.kind} layout: " + ", ".join(parts)

    def replace(self, **changes: Any) -> Layout:
        """A copy with ``changes`` (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------- attributes


def _read_mmcv(module: Any) -> dict[str, Any]:
    found: dict[str, Any] = {"pairwise": module.mode}
    if module.mode == "embedded_gaussian" and not getattr(module, "use_scale", True):
        found["scale"] = None
    if getattr(module.conv_out, "with_activation", False):
        raise ValueError("mmcv conv_out has an activation; nlref's W_z has none")
    norm = getattr(module.conv_out, "norm", None) if module.conv_out.with_norm else None
    if norm is not None and "BatchNorm" not in type(norm).__name__:
        raise ValueError(f"conv_out.norm is {norm!r}; nlref's only norm is batch norm")
    return found


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


#: The registered layouts, by name: the four public implementations first.
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
