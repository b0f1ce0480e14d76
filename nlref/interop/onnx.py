r"""A Non-local block as an ONNX graph of standard operators, from nlref's config and weights.

:func:`to_onnx` builds the forward of one block for one input shape: ``Conv`` (1×1) for
the projections, ``MaxPool`` (kernel = stride, floor) for the key side, ``MatMul``,
``Softmax``, ``Relu`` and ``Mul`` for the attention, ``BatchNormalization`` in eval mode
(or the batch statistics, written out with ``ReduceMean``, in training mode), and the
residual ``Add``. It uses the ``onnx`` package's helper API at opset 17 and nothing from
torch: the graph is written from nlref's config, step by step as :mod:`nlref.block`
computes. Weights are initializers named as nlref names its parameters (conv weights
with their 1×1 kernel dims). The graph's input is ``x`` and its output ``z``.

>>> import numpy as np, nlref
>>> from nlref.interop.onnx import to_onnx
>>> cfg = nlref.NonLocalConfig(in_channels=4, sub_sample=(2, 2))
>>> model = to_onnx(cfg, nlref.init_params(cfg, rng=0), (2, 4, 5, 6), training=False)
>>> [o.name for o in model.graph.output], model.opset_import[0].version
(['z'], 17)

Needs ``pip install onnx`` (and ``onnxruntime`` to run it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..config import NonLocalConfig
from ..pairwise import get as get_pairwise

__all__ = ["OPSET", "params_from_onnx", "to_onnx"]

#: The ONNX opset of the graphs :func:`to_onnx` writes.
OPSET = 17


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("writing ONNX graphs needs the onnx package: pip install onnx") from err
    return onnx


class _Graph:
    """Nodes and initializers, with fresh names."""

    def __init__(self) -> None:
        self.onnx = _onnx()
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.count = 0

    def const(self, value: Any, name: str | None = None, dtype: Any = np.float32) -> str:
        self.count += 1
        name = name or f"const_{self.count}"
        array = np.asarray(value, dtype=dtype)
        self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, *inputs: str, **attrs: Any) -> str:
        self.count += 1
        out = f"{op_type.lower()}_{self.count}"
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), [out], **attrs))
        return out


def to_onnx(
    cfg: NonLocalConfig,
    params: Mapping[str, Any],
    input_shape: tuple[int, ...],
    *,
    training: bool = False,
    name: str = "nonlocal",
) -> Any:
    """The forward of the block ``(cfg, params)`` on inputs of ``input_shape``, as ONNX.

    Parameters
    ----------
    cfg : NonLocalConfig
    params : mapping
        nlref parameters (:func:`nlref.param_shapes`); stored as float32 initializers.
    input_shape : tuple of int
        (B, C, \\*S), 1 to 3 spatial dims. The graph's shapes are fixed to it.
    training : bool
        Batch norm on the batch's statistics (True) or on the running ones (False).
    name : str
        The graph's name.

    Returns
    -------
    onnx.ModelProto
        Checked by ``onnx.checker``; input ``x`` and output ``z``, float32.
    """
    gr = _Graph()
    onnx = gr.onnx
    b, c, *spatial = (int(s) for s in input_shape)
    dims = len(spatial)
    ci = cfg.inter_channels
    ones = [1] * dims
    variant = get_pairwise(cfg.pairwise)
    p = {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}

    def conv(layer: str, u: str) -> str:  # a 1×1 projection, W u + b
        w = p[f"{layer}.weight"]
        w_name = gr.const(w.reshape(*w.shape, *ones), name=f"{layer}.weight")
        inputs = [u, w_name]
        if f"{layer}.bias" in p:
            inputs.append(gr.const(p[f"{layer}.bias"], name=f"{layer}.bias"))
        return gr.op("Conv", *inputs, kernel_shape=ones)

    def flat(u: str, channels: int) -> str:  # (B, channels, *S') -> (B, channels, N')
        return gr.op("Reshape", u, gr.const([b, channels, -1], dtype=np.int64))

    def pool(u: str) -> str:
        k = list(cfg.sub_sample)
        return gr.op("MaxPool", u, kernel_shape=k, strides=k)

    x = "x"
    kernel = cfg.sub_sample
    before = kernel is not None and cfg.pool_order == "before_projection"
    pooled_x = pool(x) if kernel is not None and (before or not variant.embeds) else None

    def key_side(layer: str) -> str:  # φ or g, (B, C′, N′)
        if before:
            return flat(conv(layer, pooled_x), ci)
        u = conv(layer, x)
        return flat(pool(u) if kernel is not None else u, ci)

    if variant.embeds:
        theta, phi = flat(conv("theta", x), ci), key_side("phi")
    else:  # the Gaussian: θ = x, φ = P(x)
        theta, phi = flat(x, c), flat(pooled_x if kernel is not None else x, c)
    g = key_side("g")
    n_keys = math.prod(cfg.key_shape(spatial))
    scale = cfg.effective_scale
    if cfg.pairwise == "concatenation":  # w_f = [w_θ; w_φ], split in two
        w = gr.const(p["concat.weight"].reshape(1, 2 * ci), name="concat.weight")
        sizes = gr.const([ci, ci], dtype=np.int64)
        w_theta, w_phi = "concat.weight_theta", "concat.weight_phi"
        gr.nodes.append(onnx.helper.make_node("Split", [w, sizes], [w_theta, w_phi], axis=1))
        a = gr.op("MatMul", w_theta, theta)  # (B, 1, N)
        bk = gr.op("MatMul", w_phi, phi)  # (B, 1, N′)
        pre = gr.op("Add", gr.op("Transpose", a, perm=[0, 2, 1]), bk)  # (B, N, N′)
        attention = gr.op("Mul", gr.op("Relu", pre), gr.const(1.0 / n_keys))
    else:
        s = gr.op("MatMul", gr.op("Transpose", theta, perm=[0, 2, 1]), phi)  # (B, N, N′)
        if variant.softmax:
            if scale != 1.0:
                s = gr.op("Mul", s, gr.const(scale))
            attention = gr.op("Softmax", s, axis=-1)
        elif cfg.pairwise == "dot_product":
            attention = gr.op("Mul", s, gr.const(scale / n_keys))
        else:
            raise ValueError(f"to_onnx has no graph for the pairwise variant {cfg.pairwise!r}")
    y = gr.op("MatMul", g, gr.op("Transpose", attention, perm=[0, 2, 1]))  # (B, C′, N)
    y = gr.op("Reshape", y, gr.const([b, ci, *spatial], dtype=np.int64))
    h = conv("z", y)
    if cfg.norm is None:
        o = h
    elif not training:
        names = ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")
        inputs = [gr.const(p[k], name=k) for k in names]
        o = gr.op("BatchNormalization", h, *inputs, epsilon=float(cfg.bn_eps))
    else:  # the batch's statistics (biased variance), as nlref's batch norm
        axes = [0, *range(2, 2 + dims)]
        mean = gr.op("ReduceMean", h, axes=axes, keepdims=1)
        centred = gr.op("Sub", h, mean)
        var = gr.op("ReduceMean", gr.op("Mul", centred, centred), axes=axes, keepdims=1)
        std = gr.op("Sqrt", gr.op("Add", var, gr.const(cfg.bn_eps)))
        shape = (1, c, *ones)
        gamma = gr.const(p["bn.weight"].reshape(shape), name="bn.weight")
        beta = gr.const(p["bn.bias"].reshape(shape), name="bn.bias")
        o = gr.op("Add", gr.op("Mul", gr.op("Div", centred, std), gamma), beta)
    z = gr.op("Add", o, x)
    gr.nodes.append(onnx.helper.make_node("Identity", [z], ["z"]))
    tensor = onnx.TensorProto.FLOAT
    graph = onnx.helper.make_graph(
        gr.nodes,
        name,
        [onnx.helper.make_tensor_value_info("x", tensor, [b, c, *spatial])],
        [onnx.helper.make_tensor_value_info("z", tensor, [b, c, *spatial])],
        initializer=gr.initializers,
    )
    model = onnx.helper.make_model(
        graph,
        producer_name="nlref",
        opset_imports=[onnx.helper.make_opsetid("", OPSET)],
    )
    model.ir_version = min(model.ir_version, 8)  # readable by ONNX Runtime 1.14 and later
    onnx.checker.check_model(model)
    return model


def params_from_onnx(model: Any, cfg: NonLocalConfig) -> dict[str, np.ndarray]:
    """nlref's parameters back from a graph of :func:`to_onnx` (float64, nlref shapes).

    A training-mode graph holds no running statistics (its batch norm does not read
    them): they come back as zeros and ones.
    """
    from ..params import param_shapes

    onnx = _onnx()
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    # a training-mode graph does not read the running statistics, so it does not hold them
    stored.setdefault("bn.running_mean", np.zeros(cfg.in_channels))
    stored.setdefault("bn.running_var", np.ones(cfg.in_channels))
    return {
        name: np.asarray(stored[name], dtype=np.float64).reshape(shape)
        for name, shape in param_shapes(cfg).items()
    }
