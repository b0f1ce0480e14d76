r"""Named presets: the :class:`NonLocalConfig` of each public Non-local implementation.

``nlref.preset(name, in_channels, **overrides)`` returns the config that reproduces one
implementation exactly: its rule for the inner channels C′, its logit scale α, its pool
order and default pool kernel per number of spatial dims, and which 1×1 layers have a
bias. The facts come from reading each project's source (see ``docs/conventions.md``) and
are checked against the real modules in ``tests/test_oracle_*.py``.

>>> import nlref
>>> cfg = nlref.preset("mmcv", 64, pairwise="embedded_gaussian", sub_sample=True, dims=2)
>>> cfg.inter_channels, round(cfg.scale * 32 ** 0.5, 12), cfg.sub_sample, cfg.pool_order
(32, 1.0, (2, 2), 'after_projection')
>>> nlref.preset("timm", 64).inter_channels       # make_divisible(64 / 8, 8)
8

:func:`table` renders every preset as the Markdown table in ``docs/oracle.md``; a test
checks that the docs hold exactly that table, so the two cannot drift.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .config import BIAS_LAYERS, NonLocalConfig

__all__ = [
    "ALIASES",
    "PRESETS",
    "Preset",
    "get",
    "make_divisible",
    "names",
    "preset",
    "table",
]

#: Kernel (= stride) of the max-pool per number of spatial dims, as in AlexHex7 and mmcv
#: (``MaxPool1d(2)``, ``MaxPool2d((2, 2))``, ``MaxPool3d((1, 2, 2))``).
_ALEXHEX7_KERNELS: dict[int, tuple[int, ...]] = {1: (2,), 2: (2, 2), 3: (1, 2, 2)}
_VIDEO_KERNELS: dict[int, tuple[int, ...]] = {3: (1, 2, 2)}  # Caffe2, SlowFast: (1, 2, 2)


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """timm's ``make_divisible`` (round_limit 0.9): the C′ rule of ``NonLocalAttn``.

    Rounds ``v`` to the nearest multiple of ``divisor`` (at least ``min_value``, default
    ``divisor``), adding one more ``divisor`` when rounding down lost more than 10 %.
    """
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _half(c: int) -> int:
    return max(c // 2, 1)


def _no_scale(pairwise: str, c: int, ci: int) -> float | None:
    return None


def _inv_sqrt_inner_for_softmax(pairwise: str, c: int, ci: int) -> float | None:
    return ci**-0.5 if pairwise == "embedded_gaussian" else None


def _inv_sqrt_in(pairwise: str, c: int, ci: int) -> float | None:
    return c**-0.5


def _all_biases(norm: str | None) -> tuple[str, ...]:
    return BIAS_LAYERS


def _mmcv_biases(norm: str | None) -> tuple[str, ...]:
    # ConvModule(bias="auto"): conv_out has a bias only when no norm follows it
    return BIAS_LAYERS if norm is None else ("theta", "phi", "g")


@dataclass(frozen=True)
class Preset:
    """The conventions of one implementation, as rules that :func:`preset` applies.

    Attributes
    ----------
    name : str
        The preset's name (``nlref.preset(name, ...)``).
    implementation : str
        What it reproduces (project, file or class).
    pairwise : tuple of str
        The variants the implementation has; the first is its default.
    native_names : dict
        The implementation's own name of a variant where it differs (pytorchvideo's
        ``"softmax"`` is nlref's ``"embedded_gaussian"``).
    inter_rule : str
        The C′ rule, in words, for the docs table.
    inter_channels : callable
        ``C -> C′``.
    scale_rule : str
        The logit scale α, in words.
    scale : callable
        ``(pairwise, C, C′) -> α or None``.
    pool_order : str
        ``"after_projection"`` or ``"before_projection"``.
    kernels : dict
        Number of spatial dims -> the implementation's max-pool kernel (= stride).
    pool_by_default : bool
        Whether the implementation pools unless told otherwise.
    dims : tuple of int
        The numbers of spatial dims the implementation supports.
    default_dims : int or None
        The dims assumed when pooling is on and neither ``dims`` nor a kernel is given
        (the implementation's own default, e.g. AlexHex7's ``dimension=3``).
    biases_rule : str
        Which layers have a bias, in words.
    biases : callable
        ``norm -> tuple of layers with a bias``.
    norm : str or None
        The default norm after W_z.
    bn_eps, bn_momentum : float
        The default batch-norm ε and momentum (PyTorch convention).
    notes : str
        Anything else a reader of the docs table should know.
    """

    name: str
    implementation: str
    pairwise: tuple[str, ...]
    inter_rule: str
    inter_channels: Callable[[int], int]
    scale_rule: str
    scale: Callable[[str, int, int], float | None]
    pool_order: str
    kernels: Mapping[int, tuple[int, ...]]
    pool_by_default: bool
    dims: tuple[int, ...]
    default_dims: int | None
    biases_rule: str
    biases: Callable[[str | None], tuple[str, ...]]
    norm: str | None = "batchnorm"
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    native_names: Mapping[str, str] = field(default_factory=dict)
    notes: str = ""

    def native_name(self, variant: str) -> str:
        """The implementation's own name of nlref's ``variant`` (pytorchvideo: ``"softmax"``)."""
        return self.native_names.get(variant, variant)

    def variant(self, native: str) -> str:
        """nlref's name of the implementation's variant ``native``.

        Raises
        ------
        ValueError
            If the implementation has no such variant.
        """
        for v in self.pairwise:
            if self.native_name(v) == native:
                return v
        names = tuple(self.native_name(v) for v in self.pairwise)
        raise ValueError(f"{self.name} has no variant {native!r}; it has {names}")

    def kernel(self, dims: int) -> tuple[int, ...]:
        """The implementation's pool kernel for ``dims`` spatial dims.

        Raises
        ------
        ValueError
            If the implementation has no pooling for that many dims.
        """
        if dims not in self.kernels:
            have = ", ".join(f"{d}D {k}" for d, k in sorted(self.kernels.items())) or "none"
            raise ValueError(
                f"preset {self.name!r} has no default pool kernel for {dims} spatial dims "
                f"(it has: {have}); pass sub_sample=<one kernel per dim>, e.g. (2,) * {dims}"
            )
        return self.kernels[dims]


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="paper",
            implementation="Wang et al., CVPR 2018 (arXiv 1711.07971)",
            pairwise=("embedded_gaussian", "gaussian", "dot_product", "concatenation"),
            inter_rule="C/2",
            inter_channels=_half,
            scale_rule="none",
            scale=_no_scale,
            pool_order="after_projection",
            kernels=_ALEXHEX7_KERNELS,
            pool_by_default=False,
            dims=(1, 2, 3),
            default_dims=None,
            biases_rule="all four",
            biases=_all_biases,
            notes="the paper fixes no pool kernel: these are AlexHex7's",
        ),
        Preset(
            name="caffe2",
            implementation="facebookresearch/video-nonlocal-net (Caffe2)",
            pairwise=("embedded_gaussian", "dot_product"),
            native_names={"embedded_gaussian": "USE_SOFTMAX"},
            inter_rule="C/2 (dim_in / 2)",
            inter_channels=_half,
            scale_rule="C′^-½ for softmax (USE_SCALE); none for dot product",
            scale=_inv_sqrt_inner_for_softmax,
            pool_order="before_projection",
            kernels=_VIDEO_KERNELS,
            pool_by_default=True,
            dims=(3,),
            default_dims=3,
            biases_rule="all four",
            biases=_all_biases,
            notes="video only (3-D)",
        ),
        Preset(
            name="alexhex7",
            implementation="AlexHex7/Non-local_pytorch _NonLocalBlockND",
            pairwise=("embedded_gaussian", "gaussian", "dot_product", "concatenation"),
            inter_rule="max(C // 2, 1)",
            inter_channels=_half,
            scale_rule="none",
            scale=_no_scale,
            pool_order="after_projection",
            kernels=_ALEXHEX7_KERNELS,
            pool_by_default=True,
            dims=(1, 2, 3),
            default_dims=3,
            biases_rule="all four",
            biases=_all_biases,
            notes="bn_layer=False gives norm=None",
        ),
        Preset(
            name="mmcv",
            implementation="mmcv NonLocal1d/2d/3d (mmcv-lite 2.2.0)",
            pairwise=("embedded_gaussian", "gaussian", "dot_product", "concatenation"),
            inter_rule="max(C // reduction, 1), reduction 2",
            inter_channels=_half,
            scale_rule="C′^-½ for embedded Gaussian (use_scale); none otherwise",
            scale=_inv_sqrt_inner_for_softmax,
            pool_order="after_projection",
            kernels=_ALEXHEX7_KERNELS,
            pool_by_default=False,
            dims=(1, 2, 3),
            default_dims=None,
            biases_rule="θ, φ, g; z too when norm is None",
            biases=_mmcv_biases,
            norm=None,
            notes="norm_cfg=None by default; its concatenation backward raises",
        ),
        Preset(
            name="timm",
            implementation="timm NonLocalAttn (timm/layers/non_local_attn.py)",
            pairwise=("embedded_gaussian",),
            inter_rule="make_divisible(C/8, 8)",
            inter_channels=lambda c: make_divisible(c * (1 / 8), 8),
            scale_rule="C^-½ (input channels; use_scale)",
            scale=_inv_sqrt_in,
            pool_order="after_projection",
            kernels={},
            pool_by_default=False,
            dims=(2,),
            default_dims=2,
            biases_rule="all four",
            biases=_all_biases,
            notes="2-D only, no pooling",
        ),
        Preset(
            name="pytorchvideo",
            implementation="pytorchvideo create_nonlocal / NonLocal (0.1.5), SlowFast",
            pairwise=("embedded_gaussian", "dot_product"),
            native_names={"embedded_gaussian": "softmax"},
            inter_rule="dim_inner (SlowFast: C/2)",
            inter_channels=_half,
            scale_rule="dim_inner^-½ = C′^-½ for softmax; none for dot product",
            scale=_inv_sqrt_inner_for_softmax,
            pool_order="before_projection",
            kernels=_VIDEO_KERNELS,
            pool_by_default=False,
            dims=(3,),
            default_dims=3,
            biases_rule="all four",
            biases=_all_biases,
            notes="pool_size=(1, 1, 1) (no pooling) by default; SlowFast uses (1, 2, 2)",
        ),
    )
}

#: Other names accepted by :func:`preset`.
ALIASES: dict[str, str] = {"slowfast": "pytorchvideo"}

_CONFIG_FIELDS = tuple(
    f.name for f in dataclasses.fields(NonLocalConfig) if f.name != "in_channels"
)


def names() -> tuple[str, ...]:
    """The preset names, in the order of the docs table."""
    return tuple(PRESETS)


def get(name: str) -> Preset:
    """The :class:`Preset` called ``name`` (or an alias of it, e.g. ``"slowfast"``).

    Raises
    ------
    ValueError
        If there is no such preset; the message lists the names.
    """
    if isinstance(name, str):
        key = ALIASES.get(name.lower(), name.lower())
        if key in PRESETS:
            return PRESETS[key]
    raise ValueError(
        f"unknown preset {name!r}; expected one of {names()} (aliases: {sorted(ALIASES)})"
    )


def preset(
    name: str,
    in_channels: int,
    *,
    dims: int | None = None,
    **overrides: Any,
) -> NonLocalConfig:
    """The :class:`NonLocalConfig` that reproduces implementation ``name``.

    Parameters
    ----------
    name : str
        One of :func:`names`: ``"paper"``, ``"caffe2"``, ``"alexhex7"``, ``"mmcv"``,
        ``"timm"``, ``"pytorchvideo"`` (alias ``"slowfast"``).
    in_channels : int
        C.
    dims : int, optional
        The number of spatial dims of the input (1, 2 or 3). It picks the default pool
        kernel when pooling is on, and is checked against the dims the implementation
        supports (timm is 2-D only; Caffe2 and pytorchvideo are 3-D only). Default: the
        implementation's own default where it pools by default (3 for AlexHex7 and Caffe2).
    **overrides
        Any :class:`NonLocalConfig` field except ``in_channels``. Rules that depend on
        another field follow the override: ``pairwise="dot_product"`` drops mmcv's scale,
        ``inter_channels=...`` changes the C′^-½ scale, ``norm=...`` changes mmcv's biases.
        ``sub_sample`` also accepts ``True`` (the implementation's kernel for ``dims``)
        and ``False`` (no pooling), like the implementations' own flags.

    Returns
    -------
    NonLocalConfig

    Raises
    ------
    ValueError
        For an unknown preset, a variant the implementation does not have, dims it does not
        support, or pooling requested where it has no kernel for those dims.
    TypeError
        For an override that is not a :class:`NonLocalConfig` field.

    Examples
    --------
    >>> import nlref
    >>> nlref.preset("alexhex7", 16, dims=2).sub_sample        # pools by default
    (2, 2)
    >>> cfg = nlref.preset("pytorchvideo", 16, pairwise="dot_product", sub_sample=(1, 2, 2))
    >>> cfg.scale is None, cfg.pool_order
    (True, 'before_projection')
    """
    p = get(name)
    unknown = sorted(set(overrides) - set(_CONFIG_FIELDS))
    if unknown:
        raise TypeError(
            f"preset() got unexpected override(s) {unknown}; expected NonLocalConfig fields "
            f"{list(_CONFIG_FIELDS)} or dims"
        )
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    if dims is not None and dims not in p.dims:
        raise ValueError(
            f"preset {p.name!r} ({p.implementation}) supports {_dims_text(p.dims)} inputs, "
            f"got dims={dims!r}"
        )

    pairwise = overrides.pop("pairwise", p.pairwise[0])
    if pairwise not in p.pairwise:
        raise ValueError(
            f"preset {p.name!r} ({p.implementation}) has pairwise {p.pairwise}, got "
            f"{pairwise!r}; build a NonLocalConfig directly for other combinations"
        )
    inter = overrides.pop("inter_channels", None)
    if inter is None:
        inter = p.inter_channels(in_channels)
    scale = (
        overrides.pop("scale") if "scale" in overrides else p.scale(pairwise, in_channels, inter)
    )

    sub_sample = overrides.pop("sub_sample", p.pool_by_default)
    if sub_sample is True:
        d = dims if dims is not None else p.default_dims
        if d is None:
            raise ValueError(
                f"preset {p.name!r}: sub_sample=True needs dims= (the number of spatial dims) "
                f"to choose the kernel ({_kernels_text(p)})"
            )
        sub_sample = p.kernel(d)
    elif sub_sample is False:
        sub_sample = None
    elif sub_sample is not None and dims is not None and len(tuple(sub_sample)) != dims:
        raise ValueError(
            f"sub_sample={sub_sample!r} has {len(tuple(sub_sample))} entries but dims={dims}"
        )

    norm = overrides.pop("norm", p.norm)
    biases = overrides.pop("biases", None)
    if biases is None:
        biases = p.biases(norm)
    return NonLocalConfig(
        in_channels=in_channels,
        inter_channels=inter,
        pairwise=pairwise,
        scale=scale,
        sub_sample=sub_sample,
        pool_order=overrides.pop("pool_order", p.pool_order),
        norm=norm,
        bn_eps=overrides.pop("bn_eps", p.bn_eps),
        bn_momentum=overrides.pop("bn_momentum", p.bn_momentum),
        biases=biases,
    )


def _dims_text(dims: tuple[int, ...]) -> str:
    return "/".join(f"{d}-D" for d in dims)


def _kernels_text(p: Preset) -> str:
    return ", ".join(f"{d}D {k}" for d, k in sorted(p.kernels.items())) or "no pooling"


def _fmt_scale(v: float | None) -> str:
    if v is None:
        return "1"
    for root in range(1, 257):  # show 1/√n exactly when it is one
        if math.isclose(v, root**-0.5, rel_tol=1e-12):
            return f"1/√{root}"
    return f"{v:.6g}"


def table(example_channels: int = 64) -> str:
    """Every preset as a Markdown table, computed from the presets themselves.

    The columns "C′" and "α" evaluate the rules at C = ``example_channels`` with the
    preset's default variant, and the pool column lists the kernels the presets hold, so
    that the table in ``docs/oracle.md`` cannot drift from the code (a test compares them).
    """
    c = example_channels
    header = [
        "preset",
        "implementation",
        "pairwise (default first)",
        "C′ rule",
        f"C′ at C={c}",
        "scale α rule",
        f"α at C={c}",
        "pool order",
        "pool kernel 1D / 2D / 3D",
        "pools by default",
        "biases",
        "norm",
    ]
    rows = []
    for p in PRESETS.values():
        cfg = preset(p.name, c, sub_sample=False)
        variants = ", ".join(
            f"{v} ({p.native_names[v]})" if v in p.native_names else v for v in p.pairwise
        )
        kernels = " / ".join(
            "×".join(map(str, p.kernels[d])) if d in p.kernels else "—" for d in (1, 2, 3)
        )
        rows.append(
            [
                f"`{p.name}`",
                p.implementation,
                variants,
                p.inter_rule,
                str(cfg.inter_channels),
                p.scale_rule,
                _fmt_scale(cfg.scale),
                p.pool_order.replace("_projection", " projection")
                if p.kernels
                else "— (no pooling)",
                kernels,
                "yes" if p.pool_by_default else "no",
                p.biases_rule,
                "BN" if p.norm == "batchnorm" else "none",
            ]
        )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    notes = [f"- `{p.name}`: {p.notes}." for p in PRESETS.values() if p.notes]
    aliases = ", ".join(f"`{a}` = `{t}`" for a, t in ALIASES.items())
    notes.append(f"- Aliases: {aliases}. BN defaults everywhere: ε = 1e-5, momentum 0.1.")
    return "\n".join([*lines, "", *notes])
