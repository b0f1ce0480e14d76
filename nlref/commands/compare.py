"""``nlref compare``: compare a real PyTorch Non-local module (or one of its family) with nlref.

::

    nlref compare --layout mmcv --pairwise dot_product --dims 2 --sub-sample
    nlref compare --layout mmcv --pairwise concatenation       # mmcv's backward raises
    nlref compare --layout pytorchvideo --sub-sample --eval
    nlref compare --layout timm --channels 64 --dtype float16
    nlref compare --layout mmcv-gc --pooling avg --fusion both  # GCNet's ContextBlock
    nlref compare --layout timm-gc --channels 64                # GCNet's GlobalContext
    nlref compare --layout dnl --temperature 0.05               # mmsegmentation's DNL
    nlref compare --module mypkg.blocks:make_block --layout mypkg.blocks:LAYOUT \\
        --pairwise embedded_gaussian --scale 0.25

By default the module comes from its own package (mmcv-lite, pytorchvideo, timm;
mmsegmentation for ``dnl``).
``--module PKG.MOD:FACTORY`` builds your own instead (``FACTORY()`` returns the module),
with ``--layout`` a registered name or ``PKG.MOD:ATTR`` naming a
:class:`nlref.interop.torch.Layout`. The module gets random non-degenerate weights
(:func:`nlref.testing.randomize`) and runs on a random input and upstream gradient;
:func:`nlref.testing.compare` prints one row per tensor, and a diagnosis when it differs.
The exit status is 0 when everything matches, 1 when anything differs or the module
raised, and 2 on a usage error (a package that is not installed, a size that leaves no
key position, ...).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
from typing import Any, TextIO

from . import CLIError

__all__ = ["SPATIAL", "add_parser"]

#: Default spatial shape per number of spatial dims (odd sizes: max-pool floors).
SPATIAL = {1: (9,), 2: (5, 7), 3: (3, 5, 6)}
_DEFAULT_DIMS = {"mmcv": 2, "pytorchvideo": 3, "timm": 2, "mmcv-gc": 2, "timm-gc": 2, "dnl": 2}
_DEFAULT_NORM = {"mmcv": False, "pytorchvideo": True, "timm": True, "dnl": True}
_FUSIONS = {
    "add": ("channel_add",),
    "mul": ("channel_mul",),
    "both": ("channel_add", "channel_mul"),
}


def _alive(
    module: Any, x: Any, training: bool, seed: int, testing: Any, layout: Any, overrides: dict
) -> None:
    """Redraw a concatenation module's weights until 10-90 % of its ReLUs are active."""
    import numpy as np

    from .. import forward, to_numpy
    from ..interop.torch import from_torch

    for attempt in range(50):
        testing.randomize(module, seed + 7919 * attempt)
        cfg, params = from_torch(module, layout=layout, **overrides)
        if getattr(cfg, "pairwise", None) != "concatenation":
            return
        _, cache = forward(x, params, cfg, training=training)
        if 0.1 < float(np.mean(to_numpy(cache.attention) > 0)) < 0.9:
            return


def _load(spec: str, what: str) -> Any:
    """``package.module:attribute`` -> the attribute."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CLIError(f"{what} must be PACKAGE.MODULE:NAME, got {spec!r}")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise CLIError(f"cannot load {what} {spec}: {type(err).__name__}: {err}") from err


def _check_sizes(args: argparse.Namespace) -> None:
    """The numeric options' values, checked before anything is built."""
    if args.channels is not None and args.channels < 1:
        raise CLIError(f"--channels must be >= 1, got {args.channels}")
    if args.batch < 1:
        raise CLIError(f"--batch must be >= 1, got {args.batch}")
    if args.spatial and min(args.spatial) < 1:
        sizes = " ".join(map(str, args.spatial))
        raise CLIError(f"--spatial sizes must be >= 1, got {sizes}")
    for name in ("rtol", "atol"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise CLIError(f"--{name} must be a positive number, got {value:g}")


def _check_fits(cfg: Any, x_shape: tuple[int, ...], training: bool) -> None:
    """The input fits the block: pooling leaves a key position, batch norm has statistics."""
    spatial = x_shape[2:]
    sizes = " ".join(map(str, spatial))
    kernel = getattr(cfg, "sub_sample", None)
    if kernel is not None and len(kernel) == len(spatial):
        if any(s < k for s, k in zip(spatial, kernel, strict=True)):
            raise CLIError(
                f"the max-pool {cfg.sub_sample} leaves no key position for --spatial {sizes}; "
                "each size must be at least the pool's kernel (or leave out --sub-sample)"
            )
    if getattr(cfg, "norm", None) is not None and training and x_shape[0] * math.prod(spatial) < 2:
        raise CLIError(
            f"batch norm in training mode needs more than one value per channel, but "
            f"--batch {x_shape[0]} --spatial {sizes} gives one; use --eval, --norm none or a "
            "larger input"
        )


def _family_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of the family's modules for ``make_module``, checked against --layout."""
    from ..testing import FAMILY_LAYOUTS

    gcnet = args.layout in ("mmcv-gc", "timm-gc")
    given = {
        "--pooling": args.pooling is not None,
        "--fusion": args.fusion is not None,
        "--temperature": args.temperature is not None,
    }
    allowed = ("--pooling", "--fusion") if gcnet else ("--temperature",)
    allowed = allowed if args.layout in FAMILY_LAYOUTS else ()
    wrong = [name for name, on in given.items() if on and name not in allowed]
    if wrong:
        owner = {"--pooling": "mmcv-gc, timm-gc", "--fusion": "mmcv-gc, timm-gc"}
        raise CLIError(
            f"{wrong[0]} is an option of --layout {owner.get(wrong[0], 'dnl')}, not of "
            f"--layout {args.layout}"
        )
    if args.layout in FAMILY_LAYOUTS and args.pairwise_given:
        raise CLIError(f"--layout {args.layout} has no --pairwise option")
    if gcnet:
        if args.sub_sample or args.norm != "default":
            raise CLIError(f"--layout {args.layout} (GCNet) has no --sub-sample and no --norm")
        if args.scale is not None:
            raise CLIError(f"--layout {args.layout} (GCNet) has no logit scale: leave out --scale")
        return {
            "pooling": args.pooling or "att",
            "fusion": None if args.fusion is None else _FUSIONS[args.fusion],
        }
    if args.layout != "dnl":
        return {}
    if args.scale is not None and args.scale.lower() != "none":
        raise CLIError(
            "mmsegmentation's DNL divides by √C′ (use_scale) or not: --scale none turns it off, "
            f"a number ({args.scale}) is not an option of the module"
        )
    temperature = 0.05 if args.temperature is None else args.temperature
    if not (math.isfinite(temperature) and temperature > 0):
        raise CLIError(f"--temperature must be a positive number, got {temperature:g}")
    return {"temperature": temperature, "use_scale": args.scale is None}


def _build(args: argparse.Namespace, testing: Any) -> tuple[Any, Any, int, dict[str, Any]]:
    """(module, layout, dims, config overrides)."""
    overrides: dict[str, Any] = {}
    family = _family_options(args) if not args.module else {}
    if args.scale is not None and not family:
        overrides["scale"] = None if args.scale.lower() in ("none", "1") else float(args.scale)
    if args.module:
        factory = _load(args.module, "--module")
        try:
            module = factory()
        except Exception as err:
            raise CLIError(f"--module {args.module}() raised {type(err).__name__}: {err}") from err
        layout = args.layout
        if layout is not None and ":" in layout:
            layout = _load(layout, "--layout")
        if args.pairwise_given:
            overrides["pairwise"] = args.pairwise
        weight = next((p for p in module.parameters() if p.dim() >= 3), None)
        dims = args.dims or (weight.dim() - 2 if weight is not None else 2)
        return module, layout, dims, overrides
    if args.layout is None:
        raise CLIError(
            f"--layout is required ({', '.join(testing.MODULE_LAYOUTS)}), or pass --module"
        )
    if args.layout not in testing.MODULE_LAYOUTS:
        raise CLIError(
            f"--layout {args.layout!r} cannot be built from a package; expected one of "
            f"{testing.MODULE_LAYOUTS}, or pass --module PACKAGE.MODULE:FACTORY"
        )
    dims = args.dims or _DEFAULT_DIMS[args.layout]
    norm = _DEFAULT_NORM.get(args.layout, True) if args.norm == "default" else args.norm == "bn"
    channels = args.channels or (16 if args.layout in ("mmcv-gc", "timm-gc") else 8)
    try:
        module = testing.make_module(
            args.layout,
            channels,
            pairwise=args.pairwise,
            dims=dims,
            sub_sample=args.sub_sample,
            norm=norm,
            **family,
        )
    except (ImportError, ValueError) as err:
        raise CLIError(str(err)) from err
    return module, args.layout, dims, overrides


def _cmd_compare(args: argparse.Namespace, out: TextIO) -> int:
    import numpy as np

    from .. import __version__

    try:
        import torch  # noqa: F401  (the module under test is a torch module)
    except ImportError as err:
        raise CLIError("nlref compare needs PyTorch: pip install torch") from err
    from .. import testing
    from ..config import NonLocalConfig
    from ..interop.torch import from_torch

    _check_sizes(args)
    module, layout, dims, overrides = _build(args, testing)
    spatial = tuple(args.spatial) if args.spatial else SPATIAL[dims]
    if len(spatial) != dims:
        raise CLIError(f"--spatial has {len(spatial)} sizes but --dims is {dims}")
    training = not args.eval
    try:
        cfg, _ = from_torch(module, layout=layout, **overrides)
    except (TypeError, ValueError) as err:
        raise CLIError(str(err)) from err
    if not isinstance(cfg, NonLocalConfig) and args.dtype in ("float16", "bfloat16"):
        raise CLIError(
            f"nlref compares GCNet and DNL blocks in float64 and float32 (their error budget "
            f"in {args.dtype} needs an emulation nlref has only for the Non-local block); "
            "use --dtype float32 or float64"
        )
    channels = cfg.in_channels
    x_shape = (args.batch, channels, *spatial)
    _check_fits(cfg, x_shape, training)
    x = np.random.default_rng(args.seed).standard_normal(x_shape)
    _alive(module, x, training, args.seed, testing, layout, overrides)
    module.train(training)
    name = layout if isinstance(layout, str) else getattr(layout, "name", "custom")
    print(
        f"nlref {__version__} compare: {name} {type(module).__name__}, randomised "
        f"(seed {args.seed}), x {x.shape} ~ N(0, 1), dz ~ N(0, 1)"
        + (f", BN {'train' if training else 'eval'}" if getattr(cfg, "norm", None) else "")
        + (f", {args.dtype}" if args.dtype != "float64" else ""),
        file=out,
    )
    print(file=out)
    try:
        report = testing.compare(
            module,
            x,
            training=training,
            layout=layout,
            rtol=args.rtol,
            atol=args.atol,
            seed=args.seed + 1,
            dtype=args.dtype,
            **overrides,
        )
    except ValueError as err:  # e.g. a precision the block's family is not compared in
        raise CLIError(str(err)) from err
    print(report, file=out)
    if args.json:
        try:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(report.to_dict(), fh, indent=2, ensure_ascii=False)
                fh.write("\n")
        except OSError as err:
            raise CLIError(f"cannot write --json {args.json}: {err}") from err
    return 0 if report.ok else 1


class _PairwiseAction(argparse.Action):
    """Store --pairwise and remember that it was given (it is an override for --module)."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.pairwise_given = True


def add_parser(sub: Any) -> None:
    from ..pairwise import names
    from ..testing import MODULE_LAYOUTS
    from ..testing.precision import PRECISIONS

    p = sub.add_parser(
        "compare",
        help="compare a real PyTorch Non-local module (mmcv, pytorchvideo, timm, yours), or "
        "GCNet's or DNL's, with nlref",
        description=(
            "Build the real module from its package (or yours with --module), randomise its "
            "weights, and compare its forward and autograd backward with nlref's forward and "
            "hand-derived backward, tensor by tensor, in float64 or --dtype. When it differs, "
            "the report names the conventions that would make it match. Exit status 0 when "
            "everything matches, 1 otherwise, 2 on a usage error."
        ),
    )
    p.add_argument(
        "--layout",
        metavar="NAME",
        help=f"the implementation to build ({', '.join(MODULE_LAYOUTS)}); with --module, a "
        "registered layout or PACKAGE.MODULE:ATTR naming a nlref.interop.torch.Layout "
        "(default: recognised)",
    )
    p.add_argument(
        "--module",
        metavar="PKG.MOD:FACTORY",
        help="build your own module with FACTORY() instead of a package's",
    )
    p.add_argument(
        "--pairwise",
        default="embedded_gaussian",
        choices=names(),
        metavar="NAME",
        action=_PairwiseAction,
        help=f"variant (default embedded_gaussian): {', '.join(names())}",
    )
    p.set_defaults(pairwise_given=False)
    p.add_argument(
        "--scale",
        metavar="S",
        help="the logit scale (a number, or none), for --module; with --layout dnl, none "
        "builds the module with use_scale=False",
    )
    p.add_argument(
        "--pooling",
        choices=("att", "avg"),
        help="GCNet's context (mmcv-gc, timm-gc): attention pooling (default) or the mean",
    )
    p.add_argument(
        "--fusion",
        choices=tuple(_FUSIONS),
        help="GCNet's fusion (mmcv-gc, timm-gc): channel add, channel multiply or both "
        "(default: the package's, mmcv add, timm mul)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        metavar="T",
        help="DNL's temperature τ (--layout dnl; default 0.05, DNLHead's)",
    )
    p.add_argument(
        "--dims",
        type=int,
        choices=(1, 2, 3),
        help="spatial dims (default: pytorchvideo 3, the others 2)",
    )
    p.add_argument(
        "--sub-sample", action="store_true", help="the implementation's max-pool on the key side"
    )
    p.add_argument(
        "--norm",
        choices=("default", "bn", "none"),
        default="default",
        help="BN after W_z (default: the layout's own: mmcv none, others bn; dnl bn, as "
        "DNLHead's configs)",
    )
    p.add_argument("--eval", action="store_true", help="BN in eval mode (default: training)")
    p.add_argument(
        "--dtype",
        choices=PRECISIONS,
        default="float64",
        help="run the module in this precision (default float64); below float64 each "
        "tensor's tolerance is the error of nlref in that precision",
    )
    p.add_argument("--channels", type=int, help="C (default 8; 16 for GCNet, so that C′ is not 1)")
    p.add_argument("--batch", type=int, default=2, help="B (default 2)")
    p.add_argument(
        "--spatial",
        type=int,
        nargs="+",
        metavar="S",
        help="spatial sizes (default "
        + ", ".join(f"{d}-D {'x'.join(map(str, s))}" for d, s in SPATIAL.items())
        + ")",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of weights, x and dz")
    p.add_argument("--rtol", type=float, default=1e-10, help="relative tolerance (1e-10)")
    p.add_argument("--atol", type=float, default=1e-10, help="absolute tolerance (1e-10)")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.set_defaults(func=_cmd_compare)
