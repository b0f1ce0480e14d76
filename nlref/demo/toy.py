r"""A toy task that needs long range, and two small models trained on it in pure nlref.

The task
--------
An S×S image (12×12) holds weak noise, two *markers* A and B, single pixels at least
``min_distance`` = 5 apart (in rows or in columns), and a few *distractors*. Each marker and
distractor has one of K = 4 colours. The label is 1 when A and B have the **same colour**
(half the images). Channels: 0 flags marker A, 1 flags marker B, 2…K+1 are the one-hot
colour (distractors have a colour but no flag); every channel carries N(0, noise²) noise.

Why a local model cannot solve it
---------------------------------
The *local* baseline is 1×1 conv → ReLU → 3×3 conv → ReLU → 1×1 → ReLU → global average
pool → linear. Every position's final feature depends on a 3×3 window of the input, and no
window holds both markers when they are at least 3 apart. The pooled vector is therefore a
sum of terms that each see at most one marker, so its logit difference is *additive*:

.. math::

    \ell = a(c_A, p_A) + b(c_B, p_B) + r(p_A, p_B, \text{distractors}).

"Same colour" is not additive: if a(c,·) + b(c,·) > t for every colour c while
a(c,·) + b(c′,·) < t for every c ≠ c′, summing the first over all c and the second over
the pairs (c, c+1 mod K) gives the same left-hand side, once > Kt and once < Kt. So
whatever its weights, the baseline errs on part of the data; in practice it stays near
chance. ``tests/test_toy.py`` checks the additivity exactly.

The *non-local* model replaces the 3×3 conv with a Non-local block (embedded Gaussian,
batch norm with γ = 0 at init, as in the paper). A marker's query can find the other
marker wherever it is; after training, A attends to B exactly when their colours match
(the attention computes the relation), and the 1×1 layer reads that off.

Everything is nlref: the layers are :mod:`nlref.layers` (``relu``, ``projection``,
``global_pool``) and :mod:`nlref.demo.layers` (``conv2d``, ``linear``, ``cross_entropy``,
which only the toy models use), and the block is
:func:`nlref.forward`, each with its hand-derived backward; :mod:`nlref.demo.optim` is the
optimiser. No autograd.

>>> from nlref.demo import toy
>>> result = toy.train(toy.ToyTask(), toy.ToyModel("nonlocal"))  # doctest: +SKIP
>>> result.test_acc  # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import api
from .._backend import Array, namespace, to_numpy
from ..config import NonLocalConfig
from ..layers import global_pool, projection, relu
from ..params import BUFFERS
from ..params import init_params as init_block_params
from ..progress import progress
from . import optim
from .layers import conv2d, cross_entropy, linear

__all__ = [
    "KINDS",
    "ToyBatch",
    "ToyCache",
    "ToyModel",
    "ToyTask",
    "TrainResult",
    "accuracy",
    "backward",
    "forward",
    "init_params",
    "loss_and_grads",
    "marker_attention",
    "predict",
    "sample",
    "train",
    "train_default",
    "trainable",
]

KINDS = ("nonlocal", "local")
#: α of the toy block's embedded Gaussian: larger than the usual 1/√C′ so that a few
#: hundred Adam steps can make the attention sharp enough to pick one pixel out of N = 144.
DEFAULT_SCALE = 3.0
#: The recipe of the README's numbers (about 30 s per model on 2 CPU cores).
DEFAULT_STEPS = 1000
DEFAULT_BATCH = 64
BLOCK_INITS = ("paper", "fan_in")
BLOCK_PREFIX = "nl."


# --------------------------------------------------------------------------- the task


@dataclass(frozen=True)
class ToyTask:
    """The long-range "same colour?" task.

    Parameters
    ----------
    size : int
        S: images are S×S.
    colours : int
        K, the number of marker colours (at least 2).
    min_distance : int
        Smallest Chebyshev distance max(|Δrow|, |Δcol|) between the two markers.
    distractors : int
        Pixels with a random colour but no marker flag, elsewhere in the image: they make a
        plain average over the image useless, so the model must *find* the other marker.
    noise : float
        Standard deviation of the Gaussian noise on every channel and pixel.
    """

    size: int = 12
    colours: int = 4
    min_distance: int = 5
    distractors: int = 3
    noise: float = 0.05

    def __post_init__(self) -> None:
        for name in ("size", "colours", "min_distance", "distractors"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
        if self.colours < 2:
            raise ValueError(f"colours must be >= 2, got {self.colours}")
        if not 1 <= self.min_distance < self.size:
            raise ValueError(
                f"min_distance must be in [1, size) = [1, {self.size}), got {self.min_distance}"
            )
        if not 0 <= self.distractors <= self.size**2 - 2:
            raise ValueError(
                f"distractors must be in [0, size² - 2] = [0, {self.size**2 - 2}], "
                f"got {self.distractors}"
            )
        if not (isinstance(self.noise, (int, float)) and self.noise >= 0):
            raise ValueError(f"noise must be a float >= 0, got {self.noise!r}")

    @property
    def in_channels(self) -> int:
        """C_in = 2 + K: the flags of marker A and marker B, and the one-hot colour."""
        return 2 + self.colours


@dataclass(frozen=True)
class ToyBatch:
    """A batch of the task, on the host (NumPy).

    Attributes
    ----------
    x : ndarray, shape (B, 1 + K, S, S)
    labels : ndarray of int64, shape (B,)
        1 when the markers have the same colour.
    markers : ndarray of int64, shape (B, 2, 2)
        (row, col) of marker 1 and marker 2.
    colours : ndarray of int64, shape (B, 2)
    """

    x: np.ndarray
    labels: np.ndarray
    markers: np.ndarray
    colours: np.ndarray


def sample(
    task: ToyTask,
    batch: int,
    rng: int | np.random.Generator | None = 0,
    *,
    markers: tuple[bool, bool] = (True, True),
) -> ToyBatch:
    """Draw ``batch`` images of ``task`` (NumPy, float64).

    ``markers`` lets you leave a marker out (its position and colour are still drawn and
    reported, but not painted): used to show that the local model is additive.
    """
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    s, k = task.size, task.colours
    labels = gen.integers(0, 2, batch)
    c1 = gen.integers(0, k, batch)
    other = (c1 + gen.integers(1, k, batch)) % k  # a different colour, uniformly
    c2 = np.where(labels == 1, c1, other)
    # marker positions: marker 1 uniform, marker 2 uniform among the far-enough pixels
    rows, cols = np.divmod(np.arange(s * s), s)
    pos = np.empty((batch, 2, 2), dtype=np.int64)
    for b in range(batch):
        p1 = gen.integers(0, s * s)
        far = np.maximum(np.abs(rows - rows[p1]), np.abs(cols - cols[p1])) >= task.min_distance
        p2 = gen.choice(np.flatnonzero(far))
        pos[b] = [[rows[p1], cols[p1]], [rows[p2], cols[p2]]]
    x = task.noise * gen.standard_normal((batch, task.in_channels, s, s))
    idx = np.arange(batch)
    for b in range(batch):  # distractors: a colour without the marker flag
        taken = pos[b, :, 0] * s + pos[b, :, 1]
        free = np.setdiff1d(np.arange(s * s), taken)
        where = gen.choice(free, task.distractors, replace=False)
        x[b, 2 + gen.integers(0, k, task.distractors), where // s, where % s] += 1.0
    for m, colour in ((0, c1), (1, c2)):
        if markers[m]:
            r, c = pos[:, m, 0], pos[:, m, 1]
            x[idx, m, r, c] += 1.0  # flag A (channel 0) or B (channel 1)
            x[idx, 2 + colour, r, c] += 1.0
    return ToyBatch(x=x, labels=labels.astype(np.int64), markers=pos, colours=np.stack([c1, c2], 1))


# --------------------------------------------------------------------------- the models


@dataclass(frozen=True)
class ToyModel:
    """The architecture of a toy model.

    ``"nonlocal"``: stem conv → ReLU → **Non-local block** → 1×1 → ReLU → mean → linear.
    ``"local"``: stem conv → ReLU → **conv k×k → ReLU** → 1×1 → ReLU → mean → linear.

    Parameters
    ----------
    kind : {"nonlocal", "local"}
    in_channels : int
        C_in of the images (``ToyTask.in_channels``; 6 for the default task).
    channels : int
        C, the width of the stem and of the block.
    hidden : int
        Width of the 1×1 layer before pooling.
    classes : int
    kernel : int
        Odd size of the local model's middle convolution.
    stem_kernel : int
        Odd size of the first convolution (both models; default 1, a per-pixel layer).
    block : NonLocalConfig, optional
        The block of the non-local model; default embedded Gaussian with C′ = C/2, scale
        :data:`DEFAULT_SCALE` and batch norm (γ = 0 at init: the block starts as the
        identity).
    block_init : {"fan_in", "paper"}
        ``"paper"``: every block weight N(0, 0.01²) (:func:`nlref.init_params`).
        ``"fan_in"`` (default): W_θ, W_φ, W_g drawn N(0, 1/C) instead, so that the
        attention logits are not all ≈ 0 at the start; γ = 0 still makes the block the
        identity.
    """

    kind: str
    in_channels: int = 6
    channels: int = 16
    hidden: int = 16
    classes: int = 2
    kernel: int = 3
    stem_kernel: int = 1
    block: NonLocalConfig | None = field(default=None)
    block_init: str = "fan_in"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("kernel", "stem_kernel"):
            k = getattr(self, name)
            if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 != 1:
                raise ValueError(f"{name} must be an odd int >= 1, got {k!r}")
        if self.block_init not in BLOCK_INITS:
            raise ValueError(f"block_init must be one of {BLOCK_INITS}, got {self.block_init!r}")
        if self.kind == "nonlocal":
            cfg = self.block
            if cfg is None:
                inter = max(self.channels // 2, 1)
                cfg = NonLocalConfig(
                    in_channels=self.channels,
                    inter_channels=inter,
                    pairwise="embedded_gaussian",
                    scale=DEFAULT_SCALE,
                )
            if cfg.in_channels != self.channels:
                raise ValueError(
                    f"block.in_channels={cfg.in_channels} must equal channels={self.channels}"
                )
            object.__setattr__(self, "block", cfg)
        elif self.block is not None:
            raise ValueError("a local model has no Non-local block: leave block=None")

    @property
    def receptive_field(self) -> int | None:
        """Side of the input window one pooled position sees; None (all) with the block."""
        if self.kind == "nonlocal":
            return None
        return self.stem_kernel + self.kernel - 1


@dataclass(frozen=True)
class ToyCache:
    """Everything :func:`backward` needs, layer by layer."""

    model: ToyModel
    stem: conv2d.Conv2dCache
    stem_relu: relu.ReluCache
    middle: Any  # BlockCache (non-local) or Conv2dCache (local)
    middle_relu: relu.ReluCache | None  # local only
    mix: projection.ProjectionCache
    mix_relu: relu.ReluCache
    pool: global_pool.GlobalPoolCache
    head: linear.LinearCache

    @property
    def attention(self) -> Array | None:
        """The block's attention (B, N, N), or None for the local model."""
        return self.middle.attention if self.model.kind == "nonlocal" else None


def init_params(
    model: ToyModel, rng: int | np.random.Generator | None = 0, *, xp: Any = None
) -> dict[str, Array]:
    """Parameters of ``model``: He-normal convolutions and 1×1 layers, zero biases, and the
    block's parameters (:func:`nlref.init_params`, then ``model.block_init``), their names
    prefixed ``nl.``.

    Returns
    -------
    dict
        Name -> float64 array in ``xp`` (default NumPy).
    """
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    c, k = model.channels, model.kernel

    def he(*shape: int) -> np.ndarray:
        fan_in = math.prod(shape[1:])
        return gen.normal(0.0, math.sqrt(2.0 / fan_in), shape)

    host: dict[str, np.ndarray] = {
        "stem.weight": he(c, model.in_channels, model.stem_kernel, model.stem_kernel),
        "stem.bias": np.zeros(c),
    }
    if model.kind == "local":
        host["local.weight"] = he(c, c, k, k)
        host["local.bias"] = np.zeros(c)
    host["mix.weight"] = he(model.hidden, c)
    host["mix.bias"] = np.zeros(model.hidden)
    host["head.weight"] = gen.normal(
        0.0, math.sqrt(1.0 / model.hidden), (model.classes, model.hidden)
    )
    host["head.bias"] = np.zeros(model.classes)
    if xp is None:
        xp = namespace(np.empty(0))
    params = {n: xp.asarray(v, dtype=xp.float64) for n, v in host.items()}
    if model.kind == "nonlocal":
        block_params = init_block_params(model.block, gen, xp=xp, scheme="paper")
        if model.block_init == "fan_in":  # theta, phi, g ~ N(0, 1/C); gamma = 0 still
            for name in ("theta.weight", "phi.weight", "g.weight"):
                if name in block_params:
                    shape = tuple(block_params[name].shape)
                    w = gen.normal(0.0, math.sqrt(1.0 / shape[1]), shape)
                    block_params[name] = xp.asarray(w, dtype=xp.float64)
        params.update({BLOCK_PREFIX + n: v for n, v in block_params.items()})
    return params


def _block_params(params: Mapping[str, Array]) -> dict[str, Array]:
    n = len(BLOCK_PREFIX)
    return {k[n:]: v for k, v in params.items() if k.startswith(BLOCK_PREFIX)}


def trainable(params: Mapping[str, Array]) -> dict[str, Array]:
    """The parameters that get gradients (all but the block's BN running statistics)."""
    buffers = {BLOCK_PREFIX + b for b in BUFFERS}
    return {n: v for n, v in params.items() if n not in buffers}


def forward(
    params: Mapping[str, Array], x: Array, model: ToyModel, *, training: bool = True
) -> tuple[Array, ToyCache]:
    """Logits (B, classes) of ``model`` on images x (B, C_in, S, S), and the cache.

    ``training`` is the batch-norm mode of the block (batch statistics, or running ones).
    """
    xp = namespace(x)
    if len(x.shape) != 4 or x.shape[1] != model.in_channels:
        raise ValueError(
            f"expected x of shape (B, C_in={model.in_channels}, S, S), got {tuple(x.shape)}"
        )
    b, _, s1, s2 = x.shape
    h, stem = conv2d.forward(x, params["stem.weight"], params["stem.bias"])
    h, stem_relu = relu.forward(h)
    middle_relu = None
    if model.kind == "nonlocal":
        h, middle = api.forward(h, _block_params(params), model.block, training=training)
    else:
        h, middle = conv2d.forward(h, params["local.weight"], params["local.bias"])
        h, middle_relu = relu.forward(h)
    flat = xp.reshape(h, (b, model.channels, s1 * s2))  # (B, C, N)
    u, mix = projection.forward(flat, params["mix.weight"], params["mix.bias"])
    u, mix_relu = relu.forward(u)
    pooled, pool = global_pool.forward(u)  # (B, hidden)
    logits, head = linear.forward(pooled, params["head.weight"], params["head.bias"])
    cache = ToyCache(
        model=model,
        stem=stem,
        stem_relu=stem_relu,
        middle=middle,
        middle_relu=middle_relu,
        mix=mix,
        mix_relu=mix_relu,
        pool=pool,
        head=head,
    )
    return logits, cache


def backward(dlogits: Array, cache: ToyCache) -> tuple[Array, dict[str, Array]]:
    """Hand-derived backward of :func:`forward`: (dx, grads of every trainable parameter)."""
    xp = namespace(dlogits)
    model = cache.model
    grads: dict[str, Array] = {}
    g = linear.backward(dlogits, cache.head)
    grads["head.weight"], grads["head.bias"] = g.dweight, g.dbias
    du = global_pool.backward(g.dh, cache.pool)
    du = relu.backward(du, cache.mix_relu)
    p = projection.backward(du, cache.mix)
    grads["mix.weight"], grads["mix.bias"] = p.dweight, p.dbias
    b, _, s1, s2 = cache.stem.input_shape
    dh = xp.reshape(p.dx, (b, model.channels, s1, s2))
    if model.kind == "nonlocal":
        dh, block_grads = api.backward(dh, cache.middle)
        grads.update({BLOCK_PREFIX + n: v for n, v in block_grads.items()})
    else:
        dh = relu.backward(dh, cache.middle_relu)
        c = conv2d.backward(dh, cache.middle)
        grads["local.weight"], grads["local.bias"] = c.dweight, c.dbias
        dh = c.dx
    dh = relu.backward(dh, cache.stem_relu)
    c = conv2d.backward(dh, cache.stem)
    grads["stem.weight"], grads["stem.bias"] = c.dweight, c.dbias
    return c.dx, grads


def loss_and_grads(
    params: Mapping[str, Array], x: Array, labels: Array, model: ToyModel
) -> tuple[float, dict[str, Array], ToyCache, Array]:
    """Cross-entropy of a training-mode forward and the gradients of every trainable param.

    Returns
    -------
    loss : float
    grads : dict
    cache : ToyCache
    logits : array (B, classes)
    """
    logits, cache = forward(params, x, model, training=True)
    loss, ce = cross_entropy.forward(logits, labels)
    dlogits = cross_entropy.backward(1.0, ce)
    _, grads = backward(dlogits, cache)
    return float(loss), grads, cache, logits


def predict(params: Mapping[str, Array], x: Array, model: ToyModel) -> np.ndarray:
    """Predicted classes (host int array) with the block's batch norm in evaluation mode."""
    logits, _ = forward(params, x, model, training=False)
    return np.argmax(to_numpy(logits), axis=1)


def accuracy(
    params: Mapping[str, Array], batch: ToyBatch, model: ToyModel, *, xp: Any = None
) -> float:
    """Fraction of ``batch`` classified correctly (evaluation mode)."""
    x = batch.x if xp is None else xp.asarray(batch.x)
    return float(np.mean(predict(params, x, model) == batch.labels))


@dataclass(frozen=True)
class TrainResult:
    """The outcome of :func:`train`.

    Attributes
    ----------
    task : ToyTask
    model : ToyModel
    params : dict
        The trained parameters (with the block's BN running statistics).
    losses, train_acc : list of float
        Per step, on the training batch (training-mode forward).
    test_acc : float
        Accuracy on ``test_size`` fresh images (evaluation mode).
    seconds : float
        Wall time of the training loop.
    """

    task: ToyTask
    model: ToyModel
    params: dict[str, Array]
    losses: list[float]
    train_acc: list[float]
    test_acc: float
    seconds: float


def train(
    task: ToyTask,
    model: ToyModel,
    *,
    steps: int = DEFAULT_STEPS,
    batch: int = DEFAULT_BATCH,
    lr: float = 0.01,
    seed: int = 0,
    test_size: int = 1000,
    cosine: bool = True,
    xp: Any = None,
    log_every: int = 0,
    show_progress: bool | None = False,
) -> TrainResult:
    """Train ``model`` on ``task`` with Adam, on fresh images every step.

    Parameters
    ----------
    task, model
        ``model.in_channels`` must be ``task.in_channels``. For a local model,
        ``task.min_distance`` must exceed its receptive field's radius twice over, so that
        no window sees both markers.
    steps, batch, lr, seed
        Adam steps, images per step, peak learning rate, and the seed of weights and data.
    cosine : bool
        Decay the learning rate as lr·(1 + cos(π t / steps))/2 (default), or keep it.
    test_size : int
        Fresh images for the final test accuracy (a separate seed).
    xp : array namespace, optional
        Where to train (default NumPy); data are drawn with NumPy and moved.
    log_every : int
        Print the loss every this many steps (0: silent).
    show_progress : bool or None
        A progress bar over the steps on stderr (None: when stderr is a terminal).
    """
    if model.in_channels != task.in_channels:
        raise ValueError(
            f"model.in_channels={model.in_channels} but the task has "
            f"{task.in_channels} channels (1 + colours)"
        )
    rf = model.receptive_field
    if rf is not None and task.min_distance <= rf - 1:
        raise ValueError(
            f"the local model sees {rf}x{rf} windows, so markers {task.min_distance} apart can "
            f"share one; use min_distance >= {rf} for a purely local baseline"
        )
    if xp is None:
        xp = namespace(np.empty(0))
    gen = np.random.default_rng(seed)
    params = init_params(model, gen, xp=xp)
    state = optim.adam_init(trainable(params))
    losses, train_acc = [], []
    start = time.perf_counter()
    bar = progress(range(steps), desc=f"{model.kind} training", unit="step", enabled=show_progress)
    for step in bar:
        data = sample(task, batch, gen)
        labels = xp.asarray(data.labels)
        loss, grads, cache, logits = loss_and_grads(params, xp.asarray(data.x), labels, model)
        # cosine decay to 0: the late steps are small, so BN's running statistics (used
        # at test time) catch up with the final weights
        lr_now = 0.5 * lr * (1.0 + math.cos(math.pi * step / steps)) if cosine else lr
        new, state = optim.adam_step(trainable(params), grads, state, lr=lr_now)
        if model.kind == "nonlocal":  # the block's new BN running statistics
            new.update({BLOCK_PREFIX + n: v for n, v in cache.middle.updated_buffers.items()})
        params = new
        losses.append(loss)
        train_acc.append(float(np.mean(np.argmax(to_numpy(logits), 1) == data.labels)))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        if log_every and (step + 1) % log_every == 0:
            print(f"{model.kind:>8} step {step + 1:4d}  loss {loss:.3f}  acc {train_acc[-1]:.2f}")
    seconds = time.perf_counter() - start
    test = sample(task, test_size, np.random.default_rng(seed + 10_000))
    test_acc = _batched_accuracy(params, test, model, xp)
    return TrainResult(
        task=task,
        model=model,
        params=params,
        losses=losses,
        train_acc=train_acc,
        test_acc=test_acc,
        seconds=seconds,
    )


def _batched_accuracy(
    params: Mapping[str, Array], data: ToyBatch, model: ToyModel, xp: Any, chunk: int = 250
) -> float:
    correct = 0
    for i in range(0, data.x.shape[0], chunk):
        pred = predict(params, xp.asarray(data.x[i : i + chunk]), model)
        correct += int(np.sum(pred == data.labels[i : i + chunk]))
    return correct / data.x.shape[0]


def marker_attention(
    params: Mapping[str, Array], batch: ToyBatch, model: ToyModel, *, xp: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """The trained block's attention from marker 1, and the share of it on marker 2.

    Returns
    -------
    maps : ndarray, shape (B, S, S)
        Row of the attention (evaluation mode) at marker 1's position, as an image.
    on_other : ndarray, shape (B,)
        The attention weight marker 1 gives to marker 2's pixel (uniform would be 1/S²).
    """
    if model.kind != "nonlocal":
        raise ValueError("only the non-local model has an attention map")
    x = batch.x if xp is None else xp.asarray(batch.x)
    _, cache = forward(params, x, model, training=False)
    att = to_numpy(cache.attention)  # (B, N, N)
    s = batch.x.shape[-1]
    q = batch.markers[:, 0, 0] * s + batch.markers[:, 0, 1]
    k = batch.markers[:, 1, 0] * s + batch.markers[:, 1, 1]
    idx = np.arange(att.shape[0])
    maps = att[idx, q].reshape(-1, s, s)
    return maps, att[idx, q, k]


def train_default(
    kind: str,
    *,
    seed: int = 0,
    xp: Any = None,
    log_every: int = 0,
    show_progress: bool | None = False,
) -> TrainResult:
    """The README's run: ``train(ToyTask(), ToyModel(kind), seed=seed)`` with the defaults
    (1000 Adam steps of 64 images, peak learning rate 0.01, cosine decay)."""
    return train(
        ToyTask(),
        ToyModel(kind),
        seed=seed,
        xp=xp,
        log_every=log_every,
        show_progress=show_progress,
    )
