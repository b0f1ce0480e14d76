"""Every row of docs/errors.md, tested: bad input gets the documented error and message.

docs/errors.md is a table with one row per bad input: a case id, the input, the error class
(or "works", for inputs that must work) and the message, verbatim. This module holds one
function per case id (``CASES``) and

- runs every documented row: the case must raise exactly the documented class with the
  documented text in its message; for a "works" row, run (and check its own result); for
  a "reported" row, return the report that holds the text; for an "exit 2" row (a command
  line), exit with status 2 and print one line on stderr that holds the text;
- checks that the table and ``CASES`` list the same ids, so that neither a row without a
  test nor a test without a row can exist.

Never an IndexError or a broadcast error from deep inside: a bad input is refused at the
public boundary, with a message naming what was expected and what was given.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import io
import json
import math
import os
import pickle
import re
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import array_api_compat
import numpy as np
import pytest

import nlref

from .conftest import require

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
CASES: dict[str, Callable[[], Any]] = {}
GPU_CASES = {"mixed-numpy-cupy"}  # need CuPy and a CUDA device (marker gpu)
NUMPY = array_api_compat.array_namespace(np.empty(0))


def case(case_id: str) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    def register(fn: Callable[[], Any]) -> Callable[[], Any]:
        assert case_id not in CASES, f"duplicate case {case_id}"
        CASES[case_id] = fn
        return fn

    return register


def make(xp: Any = None, dtype: str = "float64", **cfg_kw: Any) -> tuple[Any, dict[str, Any]]:
    cfg_kw.setdefault("in_channels", 4)
    cfg = nlref.NonLocalConfig(**cfg_kw)
    return cfg, nlref.init_params(cfg, rng=0, scheme="random", dtype=dtype, xp=xp)


def x_of(shape: tuple[int, ...], xp: Any = None, dtype: Any = np.float64) -> Any:
    host = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    return host if xp is None else xp.asarray(host)


def config(**kw: Any) -> nlref.NonLocalConfig:
    kw.setdefault("in_channels", 4)
    return nlref.NonLocalConfig(**kw)


# --- NonLocalConfig ------------------------------------------------------------------------

case("config-pairwise")(lambda: config(pairwise="cosine"))
case("config-in-channels-zero")(lambda: config(in_channels=0))
case("config-in-channels-type")(lambda: config(in_channels=4.0))
case("config-inter-channels-zero")(lambda: config(inter_channels=0))
case("config-scale-type")(lambda: config(scale="1"))
case("config-scale-negative")(lambda: config(scale=-1.0))
case("config-scale-nan")(lambda: config(scale=math.nan))
case("config-scale-huge")(lambda: config(scale=10**400))
case("config-scale-concatenation")(lambda: config(pairwise="concatenation", scale=0.5))
case("config-sub-sample-int")(lambda: config(sub_sample=2))
case("config-sub-sample-length")(lambda: config(sub_sample=(2, 2, 2, 2)))
case("config-sub-sample-entry")(lambda: config(sub_sample=(2, 0)))
case("config-pool-order")(lambda: config(pool_order="during"))
case("config-norm")(lambda: config(norm="layernorm"))
case("config-bn-eps")(lambda: config(bn_eps=0.0))
case("config-bn-eps-inf")(lambda: config(bn_eps=math.inf))
case("config-bn-momentum")(lambda: config(bn_momentum=1.5))
case("config-bn-momentum-bool")(lambda: config(bn_momentum=True))
case("config-biases-unknown")(lambda: config(biases=("theta", "psi")))
case("config-biases-str")(lambda: config(biases="z"))

# --- init_params ---------------------------------------------------------------------------

case("init-scheme")(lambda: nlref.init_params(config(), scheme="xavier"))
case("init-dtype")(lambda: nlref.init_params(config(), dtype="float16"))


# --- forward: x, cfg, training -------------------------------------------------------------


def forward_with_x(x: Any, **cfg_kw: Any) -> Any:
    cfg, params = make(**cfg_kw)
    return nlref.forward(x, params, cfg)


case("x-not-array")(lambda: forward_with_x([[1.0, 2.0]]))
case("x-ndim")(lambda: forward_with_x(x_of((2, 4))))
case("x-channels")(lambda: forward_with_x(x_of((2, 3, 5, 5))))
case("x-empty-batch")(lambda: forward_with_x(np.ones((0, 4, 3, 3))))
case("x-empty-spatial")(lambda: forward_with_x(np.ones((2, 4, 0, 3))))
case("x-int")(lambda: forward_with_x(np.ones((2, 4, 3, 3), dtype=np.int64)))
case("x-float16")(lambda: forward_with_x(np.ones((2, 4, 3, 3), dtype=np.float16)))
case("x-complex")(lambda: forward_with_x(np.ones((2, 4, 3, 3), dtype=np.complex128)))
case("sub-sample-dims")(lambda: forward_with_x(x_of((2, 4, 4, 4, 4)), sub_sample=(2, 2)))
case("sub-sample-no-keys")(lambda: forward_with_x(x_of((2, 4, 4, 5)), sub_sample=(2, 8)))


@case("bn-train-one-value")
def _() -> Any:
    cfg, params = make()
    return nlref.forward(x_of((1, 4, 1)), params, cfg, training=True)


@case("training-not-bool")
def _() -> Any:
    cfg, params = make()
    return nlref.forward(x_of((2, 4, 3)), params, cfg, training="yes")


@case("cfg-not-config")
def _() -> Any:
    _, params = make()
    return nlref.forward(x_of((2, 4, 3)), params, {"in_channels": 4})


@case("threads-zero")
def _() -> Any:
    cfg, params = make()
    return nlref.forward(x_of((2, 4, 3)), params, cfg, threads=0)


@case("threads-not-int")
def _() -> Any:
    cfg, params = make()
    return nlref.forward(x_of((2, 4, 3)), params, cfg, threads=2.0)


@case("memory-limit-type")
def _() -> Any:
    cfg, params = make()
    return nlref.forward(x_of((2, 4, 3)), params, cfg, memory_limit="big")


@case("memory-limit-zero")
def _() -> Any:
    cfg, params = make()
    return nlref.forward(x_of((2, 4, 3)), params, cfg, memory_limit=0)


def non_native(a: np.ndarray) -> np.ndarray:
    """``a``'s values in the other byte order (big-endian on a little-endian machine)."""
    return a.astype(a.dtype.newbyteorder("S"))


case("x-masked")(lambda: forward_with_x(np.ma.masked_array(x_of((2, 4, 3)), mask=False)))
case("x-byte-order")(lambda: forward_with_x(non_native(x_of((2, 4, 3)))))


@case("bn-eps-zero-in-dtype")
def _() -> Any:
    cfg, params = make(dtype="float32", bn_eps=1e-50)
    return nlref.forward(np.zeros((2, 4, 3), dtype=np.float32), params, cfg)


@case("threads-env")
def _() -> Any:
    cfg, params = make()
    before = os.environ.get("NLREF_NUM_THREADS")
    os.environ["NLREF_NUM_THREADS"] = "many"
    try:
        return nlref.forward(x_of((2, 4, 3)), params, cfg)
    finally:
        if before is None:
            del os.environ["NLREF_NUM_THREADS"]
        else:
            os.environ["NLREF_NUM_THREADS"] = before


# --- forward: params -----------------------------------------------------------------------


def forward_with_params(edit: Callable[[dict[str, Any]], Any], **cfg_kw: Any) -> Any:
    cfg, params = make(**cfg_kw)
    params = edit(params)
    return nlref.forward(x_of((2, 4, 3)), params, cfg)


def _set(params: dict[str, Any], name: str, value: Any) -> dict[str, Any]:
    params[name] = value
    return params


def _drop(params: dict[str, Any], name: str) -> dict[str, Any]:
    del params[name]
    return params


case("params-not-mapping")(lambda: forward_with_params(lambda p: list(p.values())))
case("params-missing")(lambda: forward_with_params(lambda p: _drop(p, "phi.weight")))
case("params-unexpected")(
    lambda: forward_with_params(
        lambda p: _set(p, "theta.weight", np.zeros((2, 4))), pairwise="gaussian"
    )
)
case("params-bias-not-in-cfg")(
    lambda: forward_with_params(
        lambda p: _set(p, "z.bias", np.zeros(4)), biases=("theta", "phi", "g")
    )
)
case("params-shape")(lambda: forward_with_params(lambda p: _set(p, "g.weight", np.zeros((4, 2)))))
case("params-key-not-str")(lambda: forward_with_params(lambda p: {3: p["g.weight"], **p}))
case("params-masked")(
    lambda: forward_with_params(lambda p: _set(p, "g.weight", np.ma.masked_array(p["g.weight"])))
)


@case("params-matrix")
def _() -> Any:
    with warnings.catch_warnings():  # NumPy discourages the matrix subclass
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        weight = np.matrix(np.zeros((2, 4)))
    return forward_with_params(lambda p: _set(p, "g.weight", weight))


case("params-byte-order")(
    lambda: forward_with_params(lambda p: _set(p, "g.weight", non_native(p["g.weight"])))
)
case("params-not-array")(lambda: forward_with_params(lambda p: _set(p, "g.bias", [0.0, 0.0])))


@case("params-dtype")
def _() -> Any:
    cfg, params = make(dtype="float32")
    return nlref.forward(x_of((2, 4, 3)), params, cfg)


@case("mixed-numpy-strict")
def _() -> Any:
    cfg, params = make(xp=require("array_api_strict"))
    return nlref.forward(x_of((2, 4, 3)), params, cfg)


@case("mixed-numpy-cupy")
def _() -> Any:
    cupy = require("cupy")
    cfg, params = make(xp=array_api_compat.array_namespace(cupy.empty(0)))
    return nlref.forward(x_of((2, 4, 3)), params, cfg)


# --- backward ------------------------------------------------------------------------------


def backward_with(dz: Any, xp: Any = None) -> Any:
    cfg, params = make(xp=xp)
    _, cache = nlref.forward(x_of((2, 4, 3), xp), params, cfg)
    return nlref.backward(dz, cache)


case("dz-not-array")(lambda: backward_with([[0.0]]))
case("dz-shape")(lambda: backward_with(np.ones((2, 4))))
case("dz-dtype")(lambda: backward_with(np.ones((2, 4, 3), dtype=np.float32)))
case("dz-library")(lambda: backward_with(np.ones((2, 4, 3)), xp=require("array_api_strict")))
case("dz-masked")(lambda: backward_with(np.ma.masked_array(np.ones((2, 4, 3)))))
case("dz-byte-order")(lambda: backward_with(non_native(np.ones((2, 4, 3)))))
case("backward-cache")(lambda: nlref.backward(np.ones((2, 4, 3)), {"attention": None}))


# --- apply_buffer_updates ------------------------------------------------------------------


def apply_to(edit: Callable[[dict[str, Any]], dict[str, Any]]) -> Any:
    cfg, params = make()
    _, cache = nlref.forward(x_of((2, 4, 3)), params, cfg, training=True)
    return nlref.apply_buffer_updates(edit(params), cache)


case("buffers-dtype")(lambda: apply_to(lambda p: {n: v.astype(np.float32) for n, v in p.items()}))
case("buffers-missing")(lambda: apply_to(lambda p: _drop(p, "bn.running_var")))


# --- gradcheck -----------------------------------------------------------------------------


def _gradcheck(x: Any, **kw: Any) -> Any:
    def fwd(inp: dict[str, Any]) -> tuple[Any, None]:
        return inp["x"] * 2.0, None

    def bwd(dout: Any, cache: None) -> dict[str, Any]:
        return {"x": dout * 2.0}

    return nlref.gradcheck(fwd, bwd, {"x": x}, **kw)


case("gradcheck-float32")(lambda: _gradcheck(np.ones(3, dtype=np.float32)))
case("gradcheck-mode")(lambda: _gradcheck(np.ones(3), mode="exact"))
case("gradcheck-rtol")(lambda: _gradcheck(np.ones(3), rtol=0))
case("gradcheck-atol")(lambda: _gradcheck(np.ones(3), atol=-1.0))
case("gradcheck-eps")(lambda: _gradcheck(np.ones(3), eps=0.0))
case("gradcheck-n-directions")(lambda: _gradcheck(np.ones(3), n_directions=0))
case("gradcheck-wrt")(lambda: _gradcheck(np.ones(3), wrt=["w"]))


# --- files: checkpoints (nlref.interop.torch) and golden vectors (nlref.vectors) ---------


def _mmcv_state_dict(**edits: Any) -> dict[str, Any]:
    """A valid mmcv NonLocal2d state_dict (embedded Gaussian, C = 4), then ``edits``."""
    require("torch")
    from nlref.interop import torch as interop

    cfg = nlref.preset("mmcv", 4, dims=2)
    params = nlref.init_params(cfg, rng=0, scheme="random")
    sd = dict(interop.to_state_dict(cfg, params, "mmcv", dims=2))
    for key, value in edits.items():
        key = key.replace("__", ".")
        if value is None:
            del sd[key]
        else:
            sd[key] = value
    return sd


def _from_state_dict(state_dict: Any, **kw: Any) -> Any:
    require("torch")
    from nlref.interop import torch as interop

    return interop.from_state_dict(state_dict, **kw)


@case("state-dict-not-mapping")
def _() -> Any:
    return _from_state_dict([1, 2])


@case("state-dict-layout")
def _() -> Any:
    return _from_state_dict(_mmcv_state_dict(), layout="keras")


@case("state-dict-undetectable")
def _() -> Any:
    torch = require("torch")
    return _from_state_dict({"foo.weight": torch.zeros(2)})


@case("state-dict-ambiguous")
def _() -> Any:
    return _from_state_dict(_mmcv_state_dict(), layout="mmcv")


@case("state-dict-missing")
def _() -> Any:
    sd = _mmcv_state_dict(conv_out__conv__weight=None)
    return _from_state_dict(sd, layout="mmcv", pairwise="embedded_gaussian")


@case("state-dict-unexpected")
def _() -> Any:
    sd = _mmcv_state_dict(extra__weight=require("torch").zeros(1))
    return _from_state_dict(sd, layout="mmcv", pairwise="embedded_gaussian")


@case("state-dict-shape")
def _() -> Any:
    sd = _mmcv_state_dict(theta__conv__weight=require("torch").zeros(3, 4, 1, 1))
    return _from_state_dict(sd, layout="mmcv", pairwise="embedded_gaussian")


@case("state-dict-prefix")
def _() -> Any:
    return _from_state_dict(_mmcv_state_dict(), prefix="backbone.")


class _Opaque:
    """A Python object that is not a tensor: torch.load(weights_only=True) refuses it."""


@contextlib.contextmanager
def _checkpoint(write: Callable[[Path], Any]) -> Iterator[Path]:
    """A file ``block.pt`` written by ``write``, in a temporary directory."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "block.pt"
        write(path)
        yield path


def _load_checkpoint(write: Callable[[Path], Any]) -> Any:
    with _checkpoint(write) as path:
        return _from_state_dict(path)


def _torch_save(content: Any) -> Callable[[Path], Any]:
    return lambda path: require("torch").save(content, path)


def _truncated(path: Path) -> None:
    require("torch").save({"t.weight": require("torch").zeros(2, 4, 1, 1)}, path)
    path.write_bytes(path.read_bytes()[:200])


case("checkpoint-not-mapping")(lambda: _load_checkpoint(_torch_save([])))
case("checkpoint-missing")(lambda: _load_checkpoint(lambda path: None))
case("checkpoint-pickled-object")(lambda: _load_checkpoint(_torch_save({"t.weight": _Opaque()})))
case("checkpoint-truncated")(lambda: _load_checkpoint(_truncated))
case("checkpoint-empty")(lambda: _load_checkpoint(lambda path: path.write_bytes(b"")))
case("checkpoint-garbage")(lambda: _load_checkpoint(lambda path: path.write_text("hello")))


_VECTORS: list[Path] = []


def _vector_source() -> Path:
    """A valid golden-vector directory (the paper preset's dot product), written once per
    session and removed at exit: copy it, never change it."""
    if not _VECTORS:
        source = Path(tempfile.mkdtemp(prefix="nlref-errors-vectors-"))
        atexit.register(shutil.rmtree, source, ignore_errors=True)
        _write_vectors(source)
        _VECTORS.append(source)
    return _VECTORS[0]


def _vectors(spoil: Callable[[Path, Path], Any] | None, run: str = "load_case") -> Any:
    """A valid golden-vector directory whose first case's file is renamed ``case.npz``,
    spoiled by ``spoil(directory, case_file)``, then read by ``load_case`` or ``check``."""
    from nlref import vectors

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "vectors"
        shutil.copytree(_vector_source(), directory)
        manifest_path = directory / "manifest.json"
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        entry = manifest["cases"][0]
        (directory / entry["file"]).rename(directory / "case.npz")
        entry["file"] = "case.npz"
        manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
        if spoil is not None:
            spoil(directory, directory / "case.npz")
        if run == "check":
            result = vectors.check(directory)
            assert not result.ok
            return "\n".join(problem for _, problem in result.failures)
        return vectors.load_case(directory, entry["name"])


def _rewrite_npz(case_file: Path, **extra: np.ndarray) -> None:
    with np.load(case_file, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    np.savez(case_file, **{**arrays, **extra})


def _add_member(case_file: Path, name: str, raw: bytes) -> None:
    with zipfile.ZipFile(case_file, "a") as zf:
        zf.writestr(name, raw)


case("vectors-no-manifest")(lambda: _vectors(lambda d, f: (d / "manifest.json").unlink(), "check"))
case("vectors-wrong-format")(
    lambda: _vectors(lambda d, f: (d / "manifest.json").write_text('{"format": "other"}'), "check")
)
case("vectors-manifest-not-json")(
    lambda: _vectors(lambda d, f: (d / "manifest.json").write_text("{not json"))
)
case("vectors-manifest-no-cases")(
    lambda: _vectors(
        lambda d, f: (d / "manifest.json").write_text(
            '{"format": "nlref-golden-vectors", "version": 1}'
        )
    )
)
case("vectors-truncated")(lambda: _vectors(lambda d, f: f.write_bytes(f.read_bytes()[:300])))
case("vectors-object-array")(
    lambda: _vectors(lambda d, f: _rewrite_npz(f, x=np.array([_Opaque(), None], dtype=object)))
)
case("vectors-pickle-member")(
    lambda: _vectors(lambda d, f: _add_member(f, "extra.npy", pickle.dumps([1, 2])))
)
case("vectors-check-truncated")(
    lambda: _vectors(lambda d, f: f.write_bytes(f.read_bytes()[:300]), "check")
)


def _write_vectors(directory: Path, **kw: Any) -> Any:
    from nlref import vectors

    return vectors.write(directory, presets=["paper"], pairwise=["dot_product"], **kw)


def _edit_manifest(directory: Path, **changes: Any) -> None:
    path = directory / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text("utf-8")), **changes}), "utf-8")


case("vectors-exists")(lambda: _vectors(lambda d, f: _write_vectors(d)))


@case("vectors-format")
def _() -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        return _write_vectors(Path(tmp), format="tflite")


case("vectors-storage")(lambda: _vectors(lambda d, f: _edit_manifest(d, storage="tflite"), "check"))


@case("onnx-variant")
def _() -> Any:
    from nlref import pairwise
    from nlref.interop.onnx import to_onnx

    # a variant of your own (here: the dot product under another name), with no ONNX graph
    pairwise.register(dataclasses.replace(pairwise.get("dot_product"), name="mine", order=99))
    try:
        cfg, params = make(pairwise="mine")
        return to_onnx(cfg, params, (2, 4, 3))
    finally:
        pairwise.unregister("mine")


# --- the family: GCNetConfig, DNLConfig, nlref.family.gcnet / dnl -------------------------


def gcnet_config(**kw: Any) -> Any:
    from nlref import family

    kw.setdefault("in_channels", 8)
    return family.GCNetConfig(**kw)


def dnl_config(**kw: Any) -> Any:
    from nlref import family

    kw.setdefault("in_channels", 8)
    return family.DNLConfig(**kw)


case("gcnet-in-channels-type")(lambda: gcnet_config(in_channels=8.0))
case("gcnet-in-channels-zero")(lambda: gcnet_config(in_channels=0))
case("gcnet-pooling")(lambda: gcnet_config(pooling="max"))
case("gcnet-fusion-str")(lambda: gcnet_config(fusion="channel_add"))
case("gcnet-fusion-empty")(lambda: gcnet_config(fusion=()))
case("gcnet-ln-eps")(lambda: gcnet_config(ln_eps=0.0))
case("gcnet-ln-eps-type")(lambda: gcnet_config(ln_eps="1e-5"))
case("dnl-temperature")(lambda: dnl_config(temperature=0))
case("dnl-scale-temperature")(lambda: dnl_config(scale=1e300, temperature=1e-300))
case("dnl-shared-field")(lambda: dnl_config(sub_sample=2))


def family_block(kind: str = "gcnet", dtype: str = "float64") -> tuple[Any, Any, dict[str, Any]]:
    """(module, cfg, params) of a small GCNet (C = 4, C′ = 2) or DNL block (C = 4)."""
    from nlref import family

    if kind == "gcnet":
        cfg: Any = family.GCNetConfig(in_channels=4, inter_channels=2)
    else:
        cfg = family.DNLConfig(in_channels=4)
    params = family.init_params(cfg, rng=0, scheme="random", dtype=dtype)
    return getattr(family, kind), cfg, params


def family_forward(
    edit: Callable[[dict[str, Any]], Any] = lambda p: p, kind: str = "gcnet", **kw: Any
) -> Any:
    block, cfg, params = family_block(kind)
    x = kw.pop("x", x_of((2, 4, 3)))
    return block.forward(x, edit(params), kw.pop("cfg", cfg), **kw)


def family_backward(dz: Any, cache_of: str = "dnl", kind: str = "dnl") -> Any:
    block, cfg, params = family_block(cache_of)
    _, cache = block.forward(x_of((2, 4, 3)), params, cfg)
    return family_block(kind)[0].backward(dz, cache)


case("family-cfg")(lambda: family_forward(cfg=config()))
case("family-params-not-mapping")(lambda: family_forward(lambda p: list(p.values())))
case("family-params-missing")(lambda: family_forward(lambda p: _drop(p, "mask.bias")))
case("family-params-not-array")(
    lambda: family_forward(lambda p: _set(p, "mask.weight", [[0.0] * 4]))
)
case("family-params-shape")(
    lambda: family_forward(lambda p: _set(p, "mask.weight", np.zeros((4, 1))))
)
case("family-params-dtype")(
    lambda: family_forward(lambda p: {n: v.astype(np.float32) for n, v in p.items()})
)
case("family-training")(lambda: family_forward(training=1))
case("family-x-channels")(lambda: family_forward(kind="dnl", x=x_of((2, 3, 5))))
case("family-backward-cache")(lambda: family_backward(np.ones((2, 4, 3)), kind="gcnet"))
case("family-dz-shape")(lambda: family_backward(np.ones((2, 4))))


@case("gcnet-avg-attention")
def _() -> Any:
    from nlref import family

    cfg = family.GCNetConfig(in_channels=4, pooling="avg")
    _, cache = family.gcnet.forward(x_of((2, 4, 3)), family.init_params(cfg), cfg)
    return cache.attention


@case("family-init-scheme")
def _() -> Any:
    from nlref import family

    return family.init_params(gcnet_config(), scheme="xavier")


# --- the oracle: layouts, compare, check_model -------------------------------------------


def layout(**kw: Any) -> Any:
    from nlref.interop import Layout

    return Layout(**{"theta": "q", "phi": "k", "g": "v", "z": "out", **kw})


case("layout-no-z")(lambda: layout(z=""))
case("layout-kind")(lambda: layout(kind="dense"))
case("layout-path-type")(lambda: layout(theta=3))
case("layout-pool-order")(lambda: layout(pool_order="middle"))
case("layout-role")(lambda: layout(pooled={"foo": "x"}))


@case("register-layout-type")
def _() -> Any:
    from nlref.interop import register_layout

    return register_layout("mine", {"g": "v", "z": "out"})


@case("register-layout-builtin")
def _() -> Any:
    from nlref.interop import register_layout

    return register_layout("mmcv", layout())


@case("register-layout-taken")
def _() -> Any:
    from nlref.interop import register_layout, unregister_layout

    register_layout("mine", layout())
    try:
        return register_layout("mine", layout(bn="out_bn"))
    finally:
        unregister_layout("mine")


@case("get-layout-type")
def _() -> Any:
    from nlref.interop import get_layout

    return get_layout(3)


def mmcv_paths(**kw: Any) -> Any:
    """A layout of your own with mmcv's paths, but no preset (so no mmcv conventions)."""
    return layout(theta="theta.conv", phi="phi.conv", g="g.conv", z="conv_out.conv", **kw)


case("custom-layout-variant")(
    lambda: _from_state_dict(_mmcv_state_dict(), layout=mmcv_paths(bn="conv_out.bn"))
)
case("custom-layout-scale")(
    lambda: _from_state_dict(
        _mmcv_state_dict(), layout=mmcv_paths(bn="conv_out.bn"), pairwise="embedded_gaussian"
    )
)
case("custom-layout-pool-order")(
    lambda: _from_state_dict(
        _mmcv_state_dict(),
        layout=mmcv_paths(bn="conv_out.bn"),
        pairwise="dot_product",
        scale=None,
        sub_sample=(2, 2),
    )
)
case("custom-layout-pool-kernel")(
    lambda: _from_state_dict(
        _mmcv_state_dict(),
        layout=mmcv_paths(bn="conv_out.bn", pool_order="after_projection"),
        pairwise="dot_product",
        scale=None,
        sub_sample=True,
    )
)
case("state-dict-override")(
    lambda: _from_state_dict(
        _mmcv_state_dict(), layout="mmcv", pairwise="embedded_gaussian", use_scale=False
    )
)
case("custom-layout-linear")(
    lambda: _from_state_dict(
        _mmcv_state_dict(), layout=mmcv_paths(kind="linear"), pairwise="dot_product"
    )
)


def _from_torch(module: Any, **kw: Any) -> Any:
    require("torch")
    from nlref.interop import torch as interop

    return interop.from_torch(module, **kw)


case("module-unrecognised")(lambda: _from_torch(require("torch").nn.Conv2d(4, 4, 1)))
case("module-layout-path")(
    lambda: _from_torch(
        require("torch").nn.Sequential(require("torch").nn.Conv2d(4, 4, 1)),
        layout=layout(g="value_conv", z="out_conv"),
    )
)


def mmcv_block(**kw: Any) -> Any:
    """A fresh mmcv NonLocal2d(4) (embedded Gaussian, batch norm): W_z and γ start at zero."""
    require("torch")
    require("mmcv")
    from mmcv.cnn import NonLocal2d

    return NonLocal2d(4, **kw)


@case("module-norm")
def _() -> Any:
    return _from_torch(mmcv_block(norm_cfg={"type": "GN", "num_groups": 2}))


def _testing() -> Any:
    require("torch")
    import nlref.testing

    return nlref.testing


def x_torch() -> Any:
    return require("torch").from_numpy(x_of((2, 4, 3, 3)))


case("compare-not-module")(lambda: _testing().compare({"theta.weight": 0}, x_torch()))
case("compare-dtype")(lambda: _testing().compare(mmcv_block(), x_torch(), dtype="int8"))
case("compare-tolerance")(lambda: _testing().compare(mmcv_block(), x_torch(), rtol=0))
case("check-model-not-module")(lambda: _testing().check_model(lambda x: x, x_torch()))
case("check-model-no-block")(
    lambda: _testing().check_model(
        require("torch").nn.Sequential(require("torch").nn.Conv2d(4, 4, 1)), x_torch()
    )
)
case("assert-matches-vacuous")(lambda: _testing().assert_matches(mmcv_block(), x_torch()))


# --- analysis, the explorer, nlref.viz ---------------------------------------------------


def uniform(b: int = 1, n: int = 4, n_keys: int = 4) -> np.ndarray:
    """A valid attention (B, N, N′): every row uniform."""
    return np.full((b, n, n_keys), 1.0 / n_keys)


def _explore(*args: Any, **kw: Any) -> Any:
    from nlref import explore

    return explore.explore(*args, **kw)


case("analysis-shape")(lambda: nlref.analysis.summarise(np.ones(4)))
case("analysis-top-k")(lambda: nlref.analysis.top_keys(uniform()[0], 0))
case("explore-no-grid")(lambda: _explore(None, uniform()))
case("explore-grid-mismatch")(lambda: _explore(None, uniform(n=6), spatial=(2, 2)))
case("explore-layers-grids")(
    lambda: _explore(None, {"a": uniform(), "b": uniform(n_keys=1)}, spatial=(2, 2))
)


@case("explore-no-rows")
def _() -> Any:
    from nlref.explore import Layer

    return _explore(None, {"mean": Layer(maps={"mean": np.ones(4) / 4})}, spatial=(2, 2))


case("explore-empty")(lambda: _explore(None, {}, spatial=(2, 2)))
case("explore-top-k")(lambda: _explore(None, uniform(), spatial=(2, 2), top_k=0))
case("explore-batch")(lambda: _explore(None, uniform(b=2), spatial=(2, 2), batch=2))


@case("explore-map-shape")
def _() -> Any:
    from nlref.explore import Layer

    return _explore(None, Layer(uniform(), maps={"prior": np.ones(3)}), spatial=(2, 2))


case("explore-image-shape")(lambda: _explore(np.ones((1, 8, 8, 3)), uniform(), spatial=(2, 2)))
case("explore-clip-frames")(
    lambda: _explore(np.ones((3, 8, 8, 3)), uniform(n=8, n_keys=8), spatial=(2, 2, 2))
)


@case("explore-from-clip")
def _() -> Any:
    from nlref import explore

    return explore.from_clip(np.ones((8, 8, 3)))


case("viz-no-spatial")(lambda: _viz().attention_row(uniform(), 0))
case("viz-kernel")(lambda: _viz().key_grid((4, 4), 4, kernel=(3, 3)))
case("viz-clip-panel")(
    lambda: _viz().plot_attention_clip(
        None, uniform(n=8, n_keys=8), 0, spatial=(2, 2, 2), colour_scale="panel"
    )
)
case("viz-comparison-shared")(
    lambda: _viz().plot_pairwise_comparison(
        None, {"gaussian": uniform(), "dot": uniform()}, 0, spatial=(2, 2), colour_scale="shared"
    )
)
case("viz-query-pixels")(
    lambda: _viz().plot_attention_2d(
        None, uniform(), [0], spatial=(2, 2), query_pixels=[(0, 0), (5, 5)]
    )
)


def _viz() -> Any:
    import nlref.viz

    return nlref.viz


@case("viz-colour-scale")
def _() -> Any:
    require("matplotlib")
    return _viz().plot_attention_2d(None, uniform(), [0], spatial=(2, 2), colour_scale="linear")


@case("viz-dpi")
def _() -> Any:
    require("matplotlib")
    with tempfile.TemporaryDirectory() as tmp:
        return _viz().save_png(_viz().new_figure(1, 1), Path(tmp) / "map.png", dpi=0)


# --- the command line ----------------------------------------------------------------------


def _cli(line: str, mmcv: bool = False) -> tuple[int, str]:
    """``nlref LINE`` in process, in an empty working directory: (exit status, stderr).

    ``PHOTO`` stands for the sample photo (matplotlib's, 600×512) and ``VECTORS`` for a
    directory that already holds golden vectors; ``mmcv`` for a line that builds an mmcv
    module."""
    from nlref.cli import main

    args = line.split()
    if "PHOTO" in args:
        require("matplotlib")
        from nlref.demo.photo import sample_photo_path

        args = [str(sample_photo_path()) if a == "PHOTO" else a for a in args]
    if args[0] == "compare":
        require("torch")
    if mmcv:
        require("mmcv")
    err = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp:
        if "VECTORS" in args:
            shutil.copytree(_vector_source(), Path(tmp) / "vectors")
            args = [str(Path(tmp) / "vectors") if a == "VECTORS" else a for a in args]
        before = os.getcwd()
        os.chdir(tmp)  # anything a command might write stays here
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                code = main(args)
        finally:
            os.chdir(before)
    return code, err.getvalue()


CLI_CASES = {
    "cli-choice": "gradcheck --pairwise cosine",
    "cli-gradcheck-seed": "gradcheck --seed -1",
    "cli-gradcheck-rtol": "gradcheck --rtol 0",
    "cli-gradcheck-atol": "gradcheck --atol -1e-9",
    "cli-compare-channels": "compare --layout mmcv --channels 0",
    "cli-compare-spatial": "compare --layout mmcv --spatial 0 3",
    "cli-compare-pool": "compare --layout mmcv --spatial 1 1 --sub-sample",
    "cli-compare-batch-norm": "compare --layout mmcv --batch 1 --spatial 1 1 --norm bn",
    "cli-compare-rtol": "compare --layout mmcv --rtol -1",
    "cli-compare-layout": "compare --layout keras",
    "cli-compare-module": "compare --module mypackage.blocks:make_block",
    "cli-compare-module-factory": "compare --module torch.nn:Linear",
    "cli-demo-dpi": "demo --dpi 0",
    "cli-bench-threads": "bench --threads 0",
    "cli-bench-repeats": "bench --repeats 0",
    "cli-attention-no-image": "attention no/such/image.png --query 5,5",
    "cli-attention-query": "attention PHOTO --query -5,3",
    "cli-attention-scale": "attention PHOTO --query 5,5 --scale 0",
    "cli-attention-scale-concatenation": (
        "attention PHOTO --query 5,5 --pairwise concatenation --scale 2"
    ),
    "cli-attention-size": "attention PHOTO --query 5,5 --size 2000",
    "cli-attention-sub-sample": "attention PHOTO --query 5,5 --sub-sample 100",
    "cli-attention-dpi": "attention PHOTO --query 5,5 --dpi 0",
    "cli-explore-input": "explore",
    "cli-explore-out": "explore --sample --out attention.png",
    "cli-explore-size": "explore --sample --size 2000",
    "cli-explore-sub-sample": "explore --clip --sub-sample 100",
    "cli-vectors-exists": "vectors --out VECTORS",
    "cli-vectors-check": "vectors --check no/such/dir",
}
CLI_BUILDS_MMCV = {"cli-compare-pool", "cli-compare-batch-norm"}  # refused after the build
for _id, _line in CLI_CASES.items():
    case(_id)(lambda line=_line, mmcv=_id in CLI_BUILDS_MMCV: _cli(line, mmcv=mmcv))


# --- inputs that must work -----------------------------------------------------------------


def assert_same_as_contiguous(
    x: Any, params: dict[str, Any], cfg: Any, dz: Any, xp: Any = NUMPY
) -> None:
    """forward/backward of these (odd-layout) arrays == those of fresh contiguous copies."""

    def run(x: Any, params: dict[str, Any], dz: Any) -> dict[str, np.ndarray]:
        z, cache = nlref.forward(x, params, cfg, training=True)
        dx, grads = nlref.backward(dz, cache)
        out = {"z": z, "attention": cache.attention, "dx": dx, **grads, **cache.updated_buffers}
        return {k: np.array(nlref.to_numpy(v), copy=True) for k, v in out.items()}

    def fresh(a: Any) -> Any:
        return xp.asarray(np.ascontiguousarray(nlref.to_numpy(a)).copy())

    got = run(x, params, dz)
    want = run(fresh(x), {n: fresh(v) for n, v in params.items()}, fresh(dz))
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-13, atol=1e-13, err_msg=name)


def _layout_case(xp: Any = NUMPY) -> tuple[Any, dict[str, Any], Any]:
    cfg, params = make(xp=xp, sub_sample=(2, 2), pairwise="embedded_gaussian")
    return cfg, params, np.random.default_rng(1)


@case("x-non-contiguous")
def _() -> None:
    for xp in (NUMPY, require("array_api_strict")):
        cfg, params, gen = _layout_case(xp)
        big = xp.asarray(gen.standard_normal((2, 4, 10, 12)))
        x = big[:, :, ::2, ::2]  # every other row and column: a strided view
        dz = xp.asarray(gen.standard_normal((2, 4, 10, 12)))[:, :, 1::2, ::2]
        if xp is NUMPY:
            assert not x.flags.c_contiguous and not dz.flags.c_contiguous
        assert_same_as_contiguous(x, params, cfg, dz, xp)


@case("x-transposed")
def _() -> None:
    for xp in (NUMPY, require("array_api_strict")):
        cfg, params, gen = _layout_case(xp)
        x = xp.permute_dims(xp.asarray(gen.standard_normal((6, 5, 4, 2))), (3, 2, 1, 0))
        dz = xp.permute_dims(xp.asarray(gen.standard_normal((2, 4, 6, 5))), (0, 1, 3, 2))
        assert tuple(x.shape) == tuple(dz.shape) == (2, 4, 5, 6)
        if xp is NUMPY:
            assert x.flags.f_contiguous and not x.flags.c_contiguous
        assert_same_as_contiguous(x, params, cfg, dz, xp)


@case("x-read-only")
def _() -> None:
    cfg, params, gen = _layout_case()
    x, dz = gen.standard_normal((2, 4, 5, 6)), gen.standard_normal((2, 4, 5, 6))
    for a in [x, dz, *params.values()]:
        a.flags.writeable = False
    assert_same_as_contiguous(x, params, cfg, dz)


@case("params-non-contiguous")
def _() -> None:
    cfg, params, gen = _layout_case()
    # weights that are transposed views, biases that are strided views
    for name, value in list(params.items()):
        if value.ndim == 2:
            params[name] = np.ascontiguousarray(value.T).T
        else:
            params[name] = np.repeat(value, 2)[::2]
        assert not params[name].flags.c_contiguous or value.ndim == 1
        np.testing.assert_array_equal(params[name], value)
    x, dz = gen.standard_normal((2, 4, 5, 6)), gen.standard_normal((2, 4, 5, 6))
    assert_same_as_contiguous(x, params, cfg, dz)


@case("x-nan-inf")
def _() -> None:
    cfg, params, gen = _layout_case()
    x = gen.standard_normal((2, 4, 5, 6))
    x[0, 1, 2, 3], x[1, 0, 0, 0] = math.nan, math.inf
    with np.errstate(invalid="ignore"):
        z, cache = nlref.forward(x, params, cfg)
        dx, _ = nlref.backward(np.ones_like(x), cache)
    assert np.isnan(z).any() and np.isnan(dx).any()  # propagated; see test_extremes.py


@case("numpy-scalars")
def _() -> None:
    gen = np.random.default_rng(2)
    x = gen.standard_normal((2, 4, 4, 6))
    plain = dict(in_channels=4, inter_channels=3, sub_sample=(2, 2), scale=0.5)
    plain |= dict(bn_eps=1e-3, bn_momentum=0.25)
    numpy_kw = dict(in_channels=np.int64(4), inter_channels=np.int32(3))
    numpy_kw |= dict(sub_sample=(np.int64(2), np.int8(2)), scale=np.float32(0.5))
    numpy_kw |= dict(bn_eps=np.float64(1e-3), bn_momentum=np.float32(0.25))
    cfg, cfg_np = config(**plain), config(**numpy_kw)
    for name in plain:  # stored as Python numbers, of the NumPy numbers' values
        value = getattr(cfg_np, name)
        assert type(value) is type(getattr(cfg, name)), name
        assert value == pytest.approx(getattr(cfg, name), rel=1e-7), name
    params = nlref.init_params(cfg, rng=0, scheme="random")
    run_kw = dict(chunk_size=3, threads=2, memory_limit=2**30)
    numpy_run = {k: np.int64(v) for k, v in run_kw.items()}
    z, cache = nlref.forward(x, params, cfg, training=True, **run_kw)
    z_np, cache_np = nlref.forward(x, params, cfg_np, training=np.True_, **numpy_run)
    assert cache_np.plan.chunk_size == 3 and cache_np.threads == 2
    np.testing.assert_allclose(z_np, z, rtol=1e-6, atol=1e-6)  # scale 0.5 in float32
    for name in cache.updated_buffers:
        np.testing.assert_allclose(cache_np.updated_buffers[name], cache.updated_buffers[name])


@case("threads-huge")
def _() -> None:
    import threading

    from nlref.engine import threads as engine_threads

    def workers() -> int:
        return sum(t.name.startswith("nlref") for t in threading.enumerate())

    cfg, params = make()
    x = x_of((2, 4, 5, 6))
    before = workers()
    z, cache = nlref.forward(x, params, cfg, threads=10**6)
    assert cache.threads == 2 * 30  # B·N runs of one query row
    assert workers() <= max(before, engine_threads.usable_cpus())
    want, _ = nlref.forward(x, params, cfg, threads=1)
    np.testing.assert_allclose(z, want, rtol=1e-12, atol=1e-12)


# --- the table -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    case_id: str
    bad_input: str
    raises: str  # an exception class name; "works"; "reported" (in a result, not raised);
    # or "exit 2" (a command line's usage error)
    parts: tuple[str, ...]  # verbatim pieces of the message, in order (none for "works")


ROW = re.compile(
    r"^\| `(?P<id>[a-z0-9-]+)` \| (?P<input>.+?) \| (?P<raises>.+?) \| (?P<message>.+) \|$"
)
PART = re.compile(r"`([^`]+)`")


def documented_rows() -> list[Row]:
    """The rows of docs/errors.md: the message column is one or more `verbatim` pieces
    separated by " … " (a path or a long detail in between is left out)."""
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        m = ROW.match(line)
        if m:
            raises = m["raises"].strip().strip("`")
            parts: tuple[str, ...] = ()
            if raises != "works":
                message = m["message"].strip()
                parts = tuple(PART.findall(message))
                assert parts, line
                assert PART.sub("", message).replace("…", "").strip() == "", line
            rows.append(Row(m["id"], m["input"].strip(), raises, parts))
    return rows


ROWS = documented_rows()


def assert_parts_in_order(message: str, row: Row) -> None:
    at = 0
    for part in row.parts:
        found = message.find(part, at)
        assert found >= 0, (
            f"{row.case_id}: the documented message is not in the error.\n"
            f"  documented: {' … '.join(row.parts)}\n  actual:     {message}"
        )
        at = found + len(part)


def test_every_row_has_a_test_and_every_test_a_row() -> None:
    ids = [r.case_id for r in ROWS]
    assert len(ids) == len(set(ids)), "a case id appears twice in docs/errors.md"
    assert sorted(set(ids) - set(CASES)) == [], "rows of docs/errors.md without a test"
    assert sorted(set(CASES) - set(ids)) == [], "tests without a row in docs/errors.md"
    assert len(ROWS) >= 60


@pytest.mark.parametrize(
    "row",
    [
        pytest.param(r, id=r.case_id, marks=[pytest.mark.gpu] if r.case_id in GPU_CASES else [])
        for r in ROWS
    ],
)
def test_documented_row(row: Row) -> None:
    run = CASES[row.case_id]
    if row.raises == "works":
        run()
        return
    if row.raises == "exit 2":  # a command line: exit status 2 and one line on stderr
        code, err = run()
        lines = err.strip().splitlines()
        assert code == 2, f"{row.case_id}: exit {code}, not 2; stderr:\n{err}"
        assert len(lines) == 1, f"{row.case_id}: expected one line on stderr, got:\n{err}"
        assert_parts_in_order(lines[0], row)
        return
    if row.raises == "reported":
        message = run()
        assert isinstance(message, str), f"{row.case_id}: a reported case returns its report"
        assert_parts_in_order(message, row)
        return
    with pytest.raises(Exception) as info:  # the class is checked exactly below
        run()
    assert type(info.value).__name__ == row.raises, (
        f"{row.case_id}: expected {row.raises}, got {type(info.value).__name__}: {info.value}"
    )
    assert_parts_in_order(str(info.value), row)


# --- variations of documented rows ---------------------------------------------------------


@pytest.mark.parametrize("shape", [(4,), (2, 4, 3, 3, 3, 3)])
def test_other_wrong_ndims(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"expected x of shape \(B, C=4, \*S\) with 1 to 3"):
        forward_with_x(x_of(shape))


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.bool_, np.complex64, np.float16])
def test_other_unsupported_dtypes(dtype: Any) -> None:
    with pytest.raises(TypeError, match=r"real floating dtype \(float32 or float64\), got"):
        forward_with_x(np.ones((2, 4, 3), dtype=dtype))


def test_eval_mode_accepts_one_value_per_channel() -> None:
    """The batch-norm refusal is for training mode only, as in PyTorch."""
    cfg, params = make()
    z, _ = nlref.forward(x_of((1, 4, 1)), params, cfg, training=False)
    assert z.shape == (1, 4, 1)
