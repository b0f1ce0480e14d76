"""Every row of docs/errors.md, tested: bad input gets the documented error and message.

docs/errors.md is a table with one row per bad input: a case id, the input, the error class
(or "works", for inputs that must work) and the message, verbatim. This module holds one
function per case id (``CASES``) and

- runs every documented row: the case must raise exactly the documented class with the
  documented text in its message, or, for a "works" row, run (and check its own result);
- checks that the table and ``CASES`` list the same ids, so that neither a row without a
  test nor a test without a row can exist.

Never an IndexError or a broadcast error from deep inside: a bad input is refused at the
public boundary, with a message naming what was expected and what was given.
"""

from __future__ import annotations

import atexit
import contextlib
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


def _vectors(spoil: Callable[[Path, Path], Any] | None, run: str = "load_case") -> Any:
    """A valid golden-vector directory whose first case's file is renamed ``case.npz``,
    spoiled by ``spoil(directory, case_file)``, then read by ``load_case`` or ``check``."""
    from nlref import vectors

    if not _VECTORS:  # written once per session, removed at exit
        source = Path(tempfile.mkdtemp(prefix="nlref-errors-vectors-"))
        atexit.register(shutil.rmtree, source, ignore_errors=True)
        vectors.write(source, presets=["paper"], pairwise=["dot_product"])
        _VECTORS.append(source)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "vectors"
        shutil.copytree(_VECTORS[0], directory)
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
    raises: str  # an exception class name; "works"; or "reported" (in a result, not raised)
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
