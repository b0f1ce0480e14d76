"""``nlref compare``: compare a real PyTorch Non-local module with nlref.

::

    nlref compare --layout mmcv --pairwise dot_product --dims 2 --sub-sample
    nlref compare --layout mmcv --pairwise concatenation       # mmcv's backward raises
    nlref compare --layout pytorchvideo --sub-sample --eval
    nlref compare --layout timm --channels 64 --dtype float16
    nlref compare --module mypkg.blocks:make_block --layout mypkg.blocks:LAYOUT \\
        --pairwise embedded_gaussian --scale 0.25

By default the module comes from its own package (mmcv-lite, pytorchvideo, timm).
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
_DEFAULT_DIMS = {"mmcv": 2, "pytorchvideo": 3, "timm": 2}
_DEFAULT_NORM = {"mmcv": False, "pytorchvideo": True, "timm": True}


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
        if cfg.pairwise != "concatenation":
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
    if args.channels < 1:
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
    if cfg.sub_sample is not None and len(cfg.sub_sample) == len(spatial):
        if any(k < 1 for k in cfg.key_shape(spatial)):
            raise CLIError(
                f"the max-pool {cfg.sub_sample} leaves no key position for --spatial {sizes}; "
                "each size must be at least the pool's kernel (or leave out --sub-sample)"
            )
    if cfg.norm is not None and training and x_shape[0] * math.prod(spatial) < 2:
        raise CLIError(
            f"batch norm in training mode needs more than one value per channel, but "
            f"--batch {x_shape[0]} --spatial {sizes} gives one; use --eval, --norm none or a "
            "larger input"
        )


def _build(args: argparse.Namespace, testing: Any) -> tuple[Any, Any, int, dict[str, Any]]:
    """(module, layout, dims, config overrides)."""
    overrides: dict[str, Any] = {}
    if args.scale is not None:
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
        raise CLIError("--layout is required (mmcv, pytorchvideo or timm), or pass --module")
    if args.layout not in testing.MODULE_LAYOUTS:
        raise CLIError(
            f"--layout {args.layout!r} cannot be built from a package; expected one of "
            f"{testing.MODULE_LAYOUTS}, or pass --module PACKAGE.MODULE:FACTORY"
        )
    dims = args.dims or _DEFAULT_DIMS[args.layout]
    norm = _DEFAULT_NORM[args.layout] if args.norm == "default" else args.norm == "bn"
    try:
        module = testing.make_module(
            args.layout,
            args.channels,
            pairwise=args.pairwise,
            dims=dims,
            sub_sample=args.sub_sample,
            norm=norm,
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
        + (f", BN {'train' if training else 'eval'}" if cfg.norm else "")
        + (f", {args.dtype}" if args.dtype != "float64" else ""),
        file=out,
    )
    print(file=out)
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
        help="compare a real PyTorch Non-local module (mmcv, pytorchvideo, timm, yours) with nlref",
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
    p.add_argument("--scale", metavar="S", help="the logit scale (a number, or none), for --module")
    p.add_argument(
        "--dims",
        type=int,
        choices=(1, 2, 3),
        help="spatial dims (default: mmcv 2, pytorchvideo 3, timm 2)",
    )
    p.add_argument(
        "--sub-sample", action="store_true", help="the implementation's max-pool on the key side"
    )
    p.add_argument(
        "--norm",
        choices=("default", "bn", "none"),
        default="default",
        help="BN after W_z (default: the layout's own: mmcv none, others bn)",
    )
    p.add_argument("--eval", action="store_true", help="BN in eval mode (default: training)")
    p.add_argument(
        "--dtype",
        choices=PRECISIONS,
        default="float64",
        help="run the module in this precision (default float64); below float64 each "
        "tensor's tolerance is the error of nlref in that precision",
    )
    p.add_argument("--channels", type=int, default=8, help="C (default 8)")
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
