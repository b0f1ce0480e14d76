"""Parameter layout of a Non-local block: names, shapes, initialisation and validation.

Names are PyTorch-like so that state_dicts map cleanly:

=====================================  ===========  =======================================
name                                   shape        note
=====================================  ===========  =======================================
``theta.weight``, ``theta.bias``       (C′, C), C′  absent for the Gaussian
``phi.weight``, ``phi.bias``           (C′, C), C′  absent for the Gaussian
``g.weight``, ``g.bias``               (C′, C), C′
``concat.weight``                      (2C′,)       concatenation only; [w_θ; w_φ]
``z.weight``, ``z.bias``               (C, C′), C
``bn.weight``, ``bn.bias``             (C,)         ``norm="batchnorm"`` only
``bn.running_mean``, ``bn.running_var``  (C,)       buffers, not trained
=====================================  ===========  =======================================

A ``<layer>.bias`` key exists exactly when ``layer`` is in ``cfg.biases``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ._backend import Array, check_plain_array, namespace, namespace_of_mapping
from .config import BIAS_LAYERS, NonLocalConfig
from .pairwise import get as get_pairwise

__all__ = [
    "BUFFERS",
    "SCHEMES",
    "apply_buffer_updates",
    "check_params",
    "in_param_order",
    "init_params",
    "param_shapes",
    "trainable_names",
]

BUFFERS = ("bn.running_mean", "bn.running_var")
SCHEMES = ("paper", "random")


def param_shapes(cfg: NonLocalConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter and buffer the block with config ``cfg`` expects, with its shape.

    The order is canonical (θ, φ, g, the variant's own, z, bn) and is the order of the
    gradients returned by :func:`nlref.backward`.
    """
    c, ci = cfg.in_channels, cfg.inter_channels
    variant = get_pairwise(cfg.pairwise)
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(layer: str, c_out: int, c_in: int) -> None:
        shapes[f"{layer}.weight"] = (c_out, c_in)
        if layer in cfg.biases:
            shapes[f"{layer}.bias"] = (c_out,)

    if variant.embeds:
        linear("theta", ci, c)
        linear("phi", ci, c)
    linear("g", ci, c)
    shapes.update(variant.extra_params(ci))
    linear("z", c, ci)
    if cfg.norm == "batchnorm":
        for name in ("bn.weight", "bn.bias", *BUFFERS):
            shapes[name] = (c,)
    return shapes


def apply_buffer_updates(params: Mapping[str, Array], cache: Any) -> dict[str, Array]:
    """A new params dict with the BN running statistics of ``cache`` (from
    :func:`nlref.forward`) applied. ``params`` itself is not modified; without batch norm,
    or after an eval-mode forward, the result equals it.

    Raises
    ------
    TypeError
        If ``cache`` is not a forward's cache, or its statistics have another dtype than
        the buffers of ``params`` (a float64 forward applied to float32 params, say):
        nothing is cast silently.
    ValueError
        If ``params`` has no such buffer.
    """
    if not hasattr(cache, "updated_buffers") or not hasattr(cache, "cfg"):
        raise TypeError(
            f"cache must be the BlockCache returned by forward, got {type(cache).__name__}"
        )
    for name, value in cache.updated_buffers.items():
        if name not in params:
            raise ValueError(
                f"params has no {name!r} for the running statistics of the cache; pass the "
                "params of the forward that made it"
            )
        if params[name].dtype != value.dtype:
            raise TypeError(
                f"the cache's {name!r} has dtype {value.dtype} but params[{name!r}] has dtype "
                f"{params[name].dtype}; nlref does not cast silently: apply the statistics to "
                "the params of the forward that made them, or cast them"
            )
    return {**params, **cache.updated_buffers}


def in_param_order(grads: Mapping[str, Array], cfg: NonLocalConfig) -> dict[str, Array]:
    """``grads`` in the canonical order of :func:`param_shapes` (the order of
    :func:`nlref.backward`'s gradients)."""
    return {name: grads[name] for name in param_shapes(cfg) if name in grads}


def trainable_names(cfg: NonLocalConfig) -> tuple[str, ...]:
    """The names :func:`nlref.backward` returns gradients for (all but the BN buffers)."""
    return tuple(n for n in param_shapes(cfg) if n not in BUFFERS)


def init_params(
    cfg: NonLocalConfig,
    rng: int | np.random.Generator | None = 0,
    *,
    dtype: str = "float64",
    xp: Any = None,
    device: Any = None,
    scheme: str = "paper",
    weight_std: float = 0.01,
) -> dict[str, Array]:
    """Create the parameters of a block.

    Parameters
    ----------
    cfg : NonLocalConfig
    rng : int, numpy.random.Generator or None
        Seed or generator. Random numbers always come from NumPy and are then moved to
        ``xp`` with ``xp.asarray``, so a seed gives the same values on every backend.
    dtype : {"float64", "float32"}
    xp : array namespace, optional
        Where to put the arrays (``numpy``, ``cupy``, ``array_api_strict``, ...). Default NumPy.
    device : optional
        Passed to ``xp.asarray``.
    scheme : {"paper", "random"}
        ``"paper"`` follows the paper and the authors' code: 1×1 weights (and
        ``concat.weight``) drawn from N(0, weight_std²), biases 0, BN β = 0, running
        mean 0, running variance 1, and BN γ = 0, or W_z = 0 when ``norm=None``. The block is
        then exactly the identity.
        ``"random"`` draws every parameter and buffer non-degenerately (weights
        N(0, 1/fan_in), biases N(0, 0.2²), γ ∈ [0.5, 1.5], running variance ∈ [0.5, 2]) so
        that no gradient is trivially zero: use it for gradient checks and comparisons.
    weight_std : float
        Standard deviation of the 1×1 weights under ``scheme="paper"``.

    Returns
    -------
    dict
        Name -> array, with the keys of :func:`param_shapes`.
    """
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)

    def draw(name: str, shape: tuple[int, ...]) -> np.ndarray:
        return draw_param(name, shape, cfg, gen, scheme, weight_std)

    return new_params(param_shapes(cfg), draw, scheme=scheme, dtype=dtype, xp=xp, device=device)


def new_params(
    shapes: Mapping[str, tuple[int, ...]],
    draw: Callable[[str, tuple[int, ...]], np.ndarray],
    *,
    scheme: str,
    dtype: str,
    xp: Any,
    device: Any,
) -> dict[str, Array]:
    """Check ``scheme`` and ``dtype``, draw every parameter of ``shapes`` on the host with
    ``draw(name, shape)``, in order, and move them to ``xp`` (default NumPy) in ``dtype``."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    host = {name: draw(name, shape) for name, shape in shapes.items()}
    if xp is None:
        xp = namespace(np.empty(0))
    target = getattr(xp, dtype)
    kwargs = {} if device is None else {"device": device}
    return {name: xp.asarray(value, dtype=target, **kwargs) for name, value in host.items()}


def draw_param(
    name: str,
    shape: tuple[int, ...],
    cfg: NonLocalConfig,
    gen: np.random.Generator,
    scheme: str,
    weight_std: float,
) -> np.ndarray:
    """One parameter of the block on the host, by :func:`init_params`' ``scheme``; any
    other 1×1 projection ``<layer>.weight``, ``<layer>.bias`` is drawn as θ's."""
    layer, kind = name.split(".", 1)
    if scheme == "random":
        if kind == "weight" and layer == "bn":
            return gen.uniform(0.5, 1.5, shape)
        if kind == "weight":
            fan_in = shape[1] if len(shape) == 2 else shape[0] // 2
            return gen.normal(0.0, 1.0 / np.sqrt(fan_in), shape)
        if kind == "running_var":
            return gen.uniform(0.5, 2.0, shape)
        return gen.normal(0.0, 0.2, shape)  # biases, BN beta, running mean
    # the paper's initialisation: the block starts as the identity
    if kind == "running_var":
        return np.ones(shape)
    if kind == "weight" and layer != "bn":
        if layer == "z" and cfg.norm is None:
            return np.zeros(shape)
        return gen.normal(0.0, weight_std, shape)
    return np.zeros(shape)  # biases, BN gamma and beta, running mean


def check_params(params: Mapping[str, Array], cfg: NonLocalConfig, x: Array) -> Any:
    """Check ``params`` against ``cfg`` and ``x``; return the shared array namespace.

    Raises
    ------
    TypeError
        If ``params`` is not a mapping, or a value is not an array of ``x``'s library and
        dtype.
    ValueError
        If a parameter is missing, unexpected, or mis-shaped. The message names it.
    """
    described = f"cfg (pairwise={cfg.pairwise!r}, norm={cfg.norm!r})"
    return check_against(params, param_shapes(cfg), cfg, described, x)


def check_against(
    params: Mapping[str, Array],
    expected: Mapping[str, tuple[int, ...]],
    cfg: Any,
    described: str,
    x: Array,
) -> Any:
    """:func:`check_params` for any block: ``params`` has exactly the names of ``expected``,
    each a plain array of that shape and of x's library and dtype. ``cfg`` (its
    ``in_channels``, ``inter_channels`` and, where it has them, ``biases``) and
    ``described`` (how the messages name it) only word the errors."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping of name -> array, got {type(params).__name__}")
    not_names = [key for key in params if not isinstance(key, str)]
    if not_names:
        raise TypeError(
            f"params keys must be parameter names (str, e.g. 'theta.weight'), got {not_names[0]!r} "
            f"({type(not_names[0]).__name__})"
        )
    missing = [n for n in expected if n not in params]
    unexpected = [n for n in params if n not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if unexpected:
            parts.append(f"unexpected {unexpected}")
        hint = ""
        layers = {n.split(".")[0] for n in missing + unexpected if n.endswith(".bias")}
        if hasattr(cfg, "biases") and layers & set(BIAS_LAYERS):
            hint = f" (cfg.biases={cfg.biases} decides which layers have a bias)"
        raise ValueError(
            f"params do not match {described}: "
            + "; ".join(parts)
            + f"{hint}. Expected exactly {list(expected)}"
        )
    for name, shape in expected.items():
        value = params[name]
        if not hasattr(value, "shape") or not hasattr(value, "dtype"):
            raise TypeError(f"parameter {name!r} must be an array, got {type(value).__name__}")
        check_plain_array(value, f"parameter {name!r}")
        if tuple(value.shape) != shape:
            raise ValueError(
                f"parameter {name!r} must have shape {shape} "
                f"(C={cfg.in_channels}, C′={cfg.inter_channels}), got {tuple(value.shape)}"
            )
    xp = namespace_of_mapping(x, {n: params[n] for n in expected})
    for name in expected:
        if params[name].dtype != x.dtype:
            raise TypeError(
                f"parameter {name!r} has dtype {params[name].dtype} but x has dtype {x.dtype}; "
                "nlref does not promote silently: cast the params or x so that they match"
            )
    return xp
