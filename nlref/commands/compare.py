"""``nlref compare``: build a real Non-local module, randomise it, and compare it with nlref.

::

    nlref compare --layout mmcv --pairwise dot_product --dims 2 --sub-sample
    nlref compare --layout mmcv --pairwise concatenation       # mmcv's backward raises
    nlref compare --layout pytorchvideo --sub-sample --eval
    nlref compare --layout timm --channels 64

The module comes from its own package (mmcv-lite, pytorchvideo, timm), gets random
non-degenerate weights (:func:`nlref.testing.randomize`), and runs on a random input and
upstream gradient; :func:`nlref.testing.compare` prints one row per tensor. The exit
status is 0 when everything matches, 1 when anything differs or the module raised, and 2 on
a usage error (for example a package that is not installed).
"""

from __future__ import annotations

import argparse
import json
from typing import Any, TextIO

from . import CLIError

__all__ = ["SPATIAL", "add_parser"]

#: Default spatial shape per number of spatial dims (odd sizes: max-pool floors).
SPATIAL = {1: (9,), 2: (5, 7), 3: (3, 5, 6)}
_DEFAULT_DIMS = {"mmcv": 2, "pytorchvideo": 3, "timm": 2}
_DEFAULT_NORM = {"mmcv": False, "pytorchvideo": True, "timm": True}


def _alive(module: Any, x: Any, training: bool, seed: int, testing: Any) -> None:
    """Redraw a concatenation module's weights until 10-90 % of its ReLUs are active."""
    import numpy as np

    from .. import forward, to_numpy
    from ..interop.torch import from_torch

    for attempt in range(50):
        testing.randomize(module, seed + 7919 * attempt)
        cfg, params = from_torch(module)
        if cfg.pairwise != "concatenation":
            return
        _, cache = forward(x, params, cfg, training=training)
        if 0.1 < float(np.mean(to_numpy(cache.attention) > 0)) < 0.9:
            return


def _cmd_compare(args: argparse.Namespace, out: TextIO) -> int:
    import numpy as np

    from .. import __version__

    try:
        import torch  # noqa: F401  (the module under test is a torch module)
    except ImportError as err:
        raise CLIError("nlref compare needs PyTorch: pip install torch") from err
    from .. import testing

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
    except ImportError as err:
        raise CLIError(str(err)) from err
    except ValueError as err:
        raise CLIError(str(err)) from err
    spatial = tuple(args.spatial) if args.spatial else SPATIAL[dims]
    if len(spatial) != dims:
        raise CLIError(f"--spatial has {len(spatial)} sizes but --dims is {dims}")
    training = not args.eval
    x = np.random.default_rng(args.seed).standard_normal((args.batch, args.channels, *spatial))
    _alive(module, x, training, args.seed, testing)
    module.train(training)
    print(
        f"nlref {__version__} compare: {args.layout} {type(module).__name__}, randomised "
        f"(seed {args.seed}), x {x.shape} ~ N(0, 1), dz ~ N(0, 1)"
        + (f", BN {'train' if training else 'eval'}" if norm else ""),
        file=out,
    )
    print(file=out)
    report = testing.compare(
        module, x, training=training, rtol=args.rtol, atol=args.atol, seed=args.seed + 1
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


def add_parser(sub: Any) -> None:
    from ..pairwise import names
    from ..testing import MODULE_LAYOUTS

    p = sub.add_parser(
        "compare",
        help="compare a real PyTorch Non-local module (mmcv, pytorchvideo, timm) with nlref",
        description=(
            "Build the real module from its package, randomise its weights, and compare its "
            "forward and autograd backward with nlref's forward and hand-derived backward in "
            "float64, tensor by tensor. Exit status 0 when everything matches, 1 otherwise."
        ),
    )
    p.add_argument(
        "--layout", required=True, choices=MODULE_LAYOUTS, help="which implementation to build"
    )
    p.add_argument(
        "--pairwise",
        default="embedded_gaussian",
        choices=names(),
        metavar="NAME",
        help=f"variant (default embedded_gaussian): {', '.join(names())}",
    )
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
