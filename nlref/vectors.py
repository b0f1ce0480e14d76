r"""Golden vectors: nlref's forward and backward, written for any framework to test against.

:func:`write` produces one ``.npz`` file per case (every pairwise variant × preset × a few
input shapes, 1-D to 3-D with odd sizes, pooling on and off, batch norm in training and eval
mode) and a ``manifest.json``; :func:`check` re-verifies a directory. Each file holds,
in float64:

===========================  =========================================================
key                          array
===========================  =========================================================
``x``                        the input, (B, C, \*S)
``dz``                       the upstream gradient ∂L/∂z, like x
``z``                        the output, like x
``attention``                f / C(x), (B, N, N′), rows = query positions, C order
``dx``                       ∂L/∂x
``param/<name>``             every parameter and BN buffer, nlref names and shapes
``grad/<name>``              ∂L/∂<name> for every trainable parameter
``buffers_after/<name>``     BN running statistics after a training-mode forward
===========================  =========================================================

Parameter names and shapes are those of :func:`nlref.param_shapes` (1×1 conv weights as
(C_out, C_in); ``concat.weight`` (2C′,) = [w_θ; w_φ]). Files are plain ``.npz`` (zip of
``.npy``), readable with ``numpy.load(path, allow_pickle=False)``, cnpy (C++), ndarray-npy
(Rust) or ``jnp.load``; nothing needs pickle. The manifest records each case's config and,
per tensor, the recommended tolerances for a float64 and a float32 implementation:
``|got − want| ≤ atol + rtol·|want|`` elementwise. See ``docs/vectors.md``.

``write(..., format="onnx")`` writes the same cases for inference engines instead, in the
ONNX backend-test layout: one folder per case with ``model.onnx`` (the block's forward as
standard operators, opset 17, with the case's weights; :func:`nlref.interop.onnx.to_onnx`)
and ``test_data_set_0/input_0.pb`` (x) and ``output_0.pb`` (z), float32. The input and the
weights are float32 numbers, and z is nlref's float64 output on exactly those numbers.

A directory that already holds vectors is refused unless ``force=True``, which first
removes the old vectors (the files of the old manifest, and any case file or folder).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .api import backward, forward
from .config import NonLocalConfig
from .params import BUFFERS
from .presets import PRESETS
from .presets import get as get_preset
from .presets import preset as make_preset
from .sampling import draw_smooth_case

__all__ = [
    "FORMAT",
    "FORMATS",
    "MANIFEST",
    "VERSION",
    "Case",
    "CheckResult",
    "check",
    "iter_cases",
    "load_case",
    "write",
]

FORMAT = "nlref-golden-vectors"
VERSION = 1
MANIFEST = "manifest.json"
#: How the cases are stored: one .npz per case, or ONNX backend-test folders.
FORMATS = ("npz", "onnx")
ONNX_DATA = "test_data_set_0"
BATCH = 2
CHANNELS = 6
#: Input spatial shapes per number of spatial dims (odd sizes: max-pool floors).
SHAPES: dict[int, tuple[tuple[int, ...], ...]] = {
    1: ((7,),),
    2: ((5, 6),),
    3: ((3, 4, 5),),
}
#: Extra shapes for presets that support a single number of dims (timm 2-D, video 3-D).
EXTRA_SHAPES: dict[int, tuple[int, ...]] = {2: (4, 7), 3: (2, 5, 7)}
F64_RTOL = 1e-9
F32_RTOL = 1e-4
F32_SCALE_ATOL = 1e-5  # float32 atol is at least this times max |want|
F32_MARGIN = 10.0  # ... and at least this times nlref's own float32 error
#: float64 atol is also at least this times nlref's float32 error: that error times
#: eps64/eps32 = 2**-29 estimates float64 rounding, with a margin of 1000 (it matters for
#: gradients that are zero by construction, where any implementation leaves rounding noise)
F64_FROM_F32 = 1000.0 * 2.0**-29
#: Absolute floors (inputs and parameters are O(1), so are the outputs).
F64_ATOL_FLOOR = 1e-13
F32_ATOL_FLOOR = 1e-6


@dataclass(frozen=True)
class Case:
    """One golden-vector case."""

    name: str
    preset: str
    cfg: NonLocalConfig
    training: bool
    shape: tuple[int, ...]

    @property
    def seed(self) -> int:
        """A seed fixed by the case's name, so that a case always holds the same numbers."""
        return zlib.crc32(self.name.encode())


def _x(sizes: Iterable[int]) -> str:
    return "x".join(str(s) for s in sizes)


def iter_cases(
    presets: Iterable[str] | None = None, pairwise: Iterable[str] | None = None
) -> Iterator[Case]:
    """Every case: preset × its variants × shapes × pooling (off, its kernel) × BN mode.

    Parameters
    ----------
    presets, pairwise : iterables of str, optional
        Restrict to these preset names / variant names (default all).
    """
    wanted_presets = None if presets is None else {get_preset(p).name for p in presets}
    names = [n for n in PRESETS if wanted_presets is None or n in wanted_presets]
    wanted = None if pairwise is None else set(pairwise)
    for name in names:
        p = PRESETS[name]
        for variant in p.pairwise:
            if wanted is not None and variant not in wanted:
                continue
            for dims in p.dims:
                shapes = list(SHAPES[dims])
                if len(p.dims) == 1:
                    shapes.append(EXTRA_SHAPES[dims])
                for spatial in shapes:
                    pools: list[bool] = [False] + ([True] if dims in p.kernels else [])
                    for pooled in pools:
                        norms = [p.norm] if name != "mmcv" else [None, "batchnorm"]
                        for norm in norms:
                            cfg = make_preset(
                                name,
                                CHANNELS,
                                dims=dims,
                                pairwise=variant,
                                sub_sample=pooled,
                                norm=norm,
                            )
                            modes = [True, False] if norm is not None else [True]
                            for training in modes:
                                pool = "pool" + _x(cfg.sub_sample) if pooled else "nopool"
                                bn = (
                                    "nonorm"
                                    if norm is None
                                    else ("bntrain" if training else "bneval")
                                )
                                case_name = f"{name}-{variant}-{_x(spatial)}-{pool}-{bn}"
                                shape = (BATCH, CHANNELS, *spatial)
                                yield Case(case_name, name, cfg, training, shape)


def _config_from_dict(d: Mapping[str, Any]) -> NonLocalConfig:
    d = dict(d)
    if d.get("sub_sample") is not None:
        d["sub_sample"] = tuple(d["sub_sample"])
    d["biases"] = tuple(d["biases"])
    return NonLocalConfig(**d)


def _compute(
    cfg: NonLocalConfig,
    x: np.ndarray,
    params: Mapping[str, np.ndarray],
    dz: np.ndarray,
    training: bool,
) -> dict[str, np.ndarray]:
    """Every output array of a case, keyed as in the files."""
    z, cache = forward(x, params, cfg, training=training)
    dx, grads = backward(dz, cache)
    attention = cache.attention_rows(0, math.prod(x.shape[2:]))  # also when computed in tiles
    out = {"z": z, "attention": attention, "dx": dx}
    out.update({f"grad/{k}": v for k, v in grads.items()})
    out.update({f"buffers_after/{k}": v for k, v in cache.updated_buffers.items()})
    return {k: np.asarray(v) for k, v in out.items()}


def _case_arrays(case: Case, float32_inputs: bool = False) -> dict[str, np.ndarray]:
    gen = np.random.default_rng(case.seed)
    # away from max-pool ties and ReLU kinks, with a live concatenation ReLU: a float32
    # implementation must not land on the other side of a kink
    params, x = draw_smooth_case(case.cfg, case.shape, gen, margin=1e-3)
    dz = gen.standard_normal(case.shape)
    if float32_inputs:  # float32 numbers, held exactly in float64
        params = {k: np.asarray(v, np.float32).astype(np.float64) for k, v in params.items()}
        x, dz = (np.asarray(a, np.float32).astype(np.float64) for a in (x, dz))
    arrays = {"x": np.asarray(x), "dz": dz}
    arrays.update({f"param/{k}": np.asarray(v) for k, v in params.items()})
    arrays.update(_compute(case.cfg, arrays["x"], params, dz, case.training))
    return arrays


_INPUTS = ("x", "dz")


def _outputs(arrays: Mapping[str, np.ndarray]) -> list[str]:
    return [k for k in arrays if k not in _INPUTS and not k.startswith("param/")]


def _tolerances(case: Case, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Per output tensor: float64 and float32 (rtol, atol), from nlref's own float32 run."""
    params32 = {
        k[len("param/") :]: v.astype(np.float32)
        for k, v in arrays.items()
        if k.startswith("param/")
    }
    got32 = _compute(
        case.cfg,
        arrays["x"].astype(np.float32),
        params32,
        arrays["dz"].astype(np.float32),
        case.training,
    )
    tol = {}
    for key in _outputs(arrays):
        want = arrays[key]
        scale = float(np.max(np.abs(want), initial=0.0))
        err32 = float(np.max(np.abs(got32[key].astype(np.float64) - want), initial=0.0))
        tol[key] = {
            "max_abs": scale,
            "float64": {
                "rtol": F64_RTOL,
                "atol": max(F64_RTOL * scale, F64_FROM_F32 * err32, F64_ATOL_FLOOR),
            },
            "float32": {
                "rtol": F32_RTOL,
                "atol": max(F32_MARGIN * err32, F32_SCALE_ATOL * scale, F32_ATOL_FLOOR),
                "nlref_float32_max_abs_err": err32,
            },
        }
    return tol


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _case_entry(case: Case, stored: Mapping[str, Any], **described: Any) -> dict[str, Any]:
    """A case's manifest entry: its name, where it is ``stored``, its config, then what
    ``described`` adds (its arrays' shapes, its tolerances)."""
    return {
        "name": case.name,
        **stored,
        "preset": case.preset,
        "config": case.cfg.to_dict(),
        "training": case.training,
        "input_shape": list(case.shape),
        **described,
    }


def _write_npz(out: Path, case: Case) -> dict[str, Any]:
    arrays = _case_arrays(case)
    path = out / f"{case.name}.npz"
    with path.open("wb") as fh:
        np.savez(fh, **arrays)
    return _case_entry(
        case,
        {"file": path.name, "sha256": _sha256(path)},
        arrays={k: list(v.shape) for k, v in arrays.items()},
        tolerances=_tolerances(case, arrays),
    )


def _write_onnx(out: Path, case: Case) -> dict[str, Any]:
    from .interop.onnx import _onnx, to_onnx

    onnx = _onnx()
    arrays = _case_arrays(case, float32_inputs=True)
    params = {k[len("param/") :]: v for k, v in arrays.items() if k.startswith("param/")}
    folder = out / case.name
    (folder / ONNX_DATA).mkdir(parents=True)
    model = to_onnx(case.cfg, params, case.shape, training=case.training, name=case.name)
    tensors = {
        "model.onnx": model.SerializeToString(),
        f"{ONNX_DATA}/input_0.pb": _tensor_bytes(onnx, arrays["x"], "x"),
        f"{ONNX_DATA}/output_0.pb": _tensor_bytes(onnx, arrays["z"], "z"),
    }
    files = {}
    for rel, data in tensors.items():
        (folder / rel).write_bytes(data)
        files[rel] = hashlib.sha256(data).hexdigest()
    stored = {"file": case.name, "files": files}
    return _case_entry(case, stored, tolerances={"z": _tolerances(case, arrays)["z"]})


def _tensor_bytes(onnx: Any, array: np.ndarray, name: str) -> bytes:
    return onnx.numpy_helper.from_array(np.asarray(array, np.float32), name).SerializeToString()


def _existing(out: Path) -> list[Path]:
    """What in ``out`` belongs to golden vectors: the manifest, the files and folders it
    lists, and any case file (``*.npz``) or ONNX case folder."""
    if not out.is_dir():
        return []
    found: set[Path] = set()
    manifest = out / MANIFEST
    if manifest.is_file():
        found.add(manifest)
        try:
            listed = json.loads(manifest.read_text(encoding="utf-8")).get("cases", [])
        except (ValueError, UnicodeDecodeError, AttributeError):
            listed = []
        for entry in listed if isinstance(listed, list) else []:
            name = entry.get("file") if isinstance(entry, dict) else None
            if isinstance(name, str) and name and "/" not in name and name not in (".", ".."):
                if (out / name).exists():
                    found.add(out / name)
    found.update(p for p in out.glob("*.npz") if p.is_file())
    found.update(p.parent.parent for p in out.glob(f"*/{ONNX_DATA}/output_0.pb"))
    return sorted(found)


def write(
    out_dir: str | os.PathLike[str],
    presets: Iterable[str] | None = None,
    pairwise: Iterable[str] | None = None,
    *,
    format: str = "npz",
    force: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Write every case of :func:`iter_cases` to ``out_dir`` and return the manifest.

    Parameters
    ----------
    out_dir : path
        Created if needed.
    presets, pairwise : iterables of str, optional
        Only these presets / variants.
    format : {"npz", "onnx"}
        One ``.npz`` per case, or one ONNX backend-test folder per case.
    force : bool
        Replace the vectors ``out_dir`` already holds (their files and folders are
        removed first); without it such a directory is refused.
    progress : bool or None
        A progress bar on stderr: None shows it when stderr is a terminal.

    Raises
    ------
    ValueError
        If no case matches, or ``format`` is unknown.
    FileExistsError
        If ``out_dir`` already holds vectors and ``force`` is False.
    """
    import shutil

    from . import __version__
    from .progress import progress as progress_bar

    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    cases = list(iter_cases(presets, pairwise))
    if not cases:
        raise ValueError(f"no case matches presets={presets!r}, pairwise={pairwise!r}")
    out = Path(out_dir)
    old = _existing(out)
    if old and not force:
        shown = ", ".join(p.name for p in old[:3]) + (", ..." if len(old) > 3 else "")
        raise FileExistsError(
            f"{out} already holds golden vectors ({len(old)} entries: {shown}); pass "
            "--force (force=True) to replace them"
        )
    for path in old:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_case = _write_npz if format == "npz" else _write_onnx
    entries = [
        write_case(out, case)
        for case in progress_bar(cases, desc=f"vectors ({format})", unit="case", enabled=progress)
    ]
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "nlref_version": __version__,
        "storage": format,
        "dtype": "float64" if format == "npz" else "float32",
        "comparison": "elementwise |got - want| <= atol + rtol * |want|, with the tolerances "
        "of your implementation's dtype (tolerances.<tensor>.float64 or .float32)",
        "keys": _KEYS if format == "npz" else _ONNX_KEYS,
        "cases": entries,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


_KEYS = {
    "x": "input (B, C, *S)",
    "dz": "upstream gradient dL/dz, like x",
    "z": "output, like x",
    "attention": "f / C(x), (B, N, N'), N = prod(S) query positions in C order, "
    "N' key positions after pooling",
    "dx": "dL/dx",
    "param/<name>": "parameters and BN buffers, names and shapes of "
    "nlref.param_shapes: 1x1 conv weights (C_out, C_in), concat.weight (2C',) = "
    "[w_theta; w_phi]; an absent <layer>.bias means no bias",
    "grad/<name>": "dL/d<name> for every trainable parameter",
    "buffers_after/<name>": "BN running statistics after the training-mode forward "
    "(PyTorch's update: unbiased variance, momentum config.bn_momentum)",
}
_ONNX_KEYS = {
    "model.onnx": "the block's forward, standard ONNX operators (opset 17), input x, "
    "output z, the case's weights as float32 initializers named as nlref's parameters",
    "test_data_set_0/input_0.pb": "x (B, C, *S), a float32 TensorProto",
    "test_data_set_0/output_0.pb": "z, nlref's float64 output on those float32 numbers, "
    "rounded to float32",
}


def _read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of ``directory``, checked: a clear error naming the file otherwise."""
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: write vectors with `nlref vectors --out`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{path} is not an {FORMAT} manifest (format={got!r})")
    if manifest.get("version") != VERSION:
        raise ValueError(
            f"{path} is version {manifest.get('version')!r}; this nlref reads version {VERSION}"
        )
    cases = manifest.get("cases")
    if not isinstance(cases, list) or not all(isinstance(c, dict) for c in cases):
        raise ValueError(f"{path} has no list of cases")
    return manifest


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of one case file, loaded without pickle; float64 arrays or a clear error."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise
    except Exception as err:  # not a zip, truncated, object arrays (would need pickle)
        raise ValueError(f"cannot read {path.name} ({path}): {type(err).__name__}: {err}") from err
    bad = [k for k, v in arrays.items() if not isinstance(v, np.ndarray) or v.dtype != np.float64]
    if bad:
        raise ValueError(f"{path.name} ({path}): members {bad} are not float64 .npy arrays")
    return arrays


def load_case(directory: str | os.PathLike[str], name: str) -> tuple[dict[str, Any], dict]:
    """The manifest entry and the arrays of case ``name`` (loaded with allow_pickle=False).

    Raises
    ------
    FileNotFoundError
        If the manifest or the case's file is missing.
    KeyError
        If the manifest has no case ``name``.
    ValueError
        If the manifest or the file is malformed; the message names the file.
    """
    directory = Path(directory)
    for entry in _read_manifest(directory)["cases"]:
        if entry.get("name") == name:
            return entry, _read_npz(directory / entry["file"])
    raise KeyError(f"no case {name!r} in {directory / MANIFEST}")


@dataclass
class CheckResult:
    """The outcome of :func:`check`: ``failures`` lists ``(case, problem)``; ``per_preset``
    maps each preset to ``[cases, tensors, worst]``."""

    cases: int = 0
    tensors: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    worst_rel: float = 0.0  # max |got - want| / (atol + rtol |want|) over all tensors
    storage: str = "npz"
    per_preset: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every case was recomputed and matched."""
        return self.cases > 0 and not self.failures

    def _count(self, preset: str, ratio: float | None = None) -> None:
        row = self.per_preset.setdefault(preset, [0, 0, 0.0])
        if ratio is None:
            row[0] += 1
            self.cases += 1
        else:
            row[1] += 1
            row[2] = max(row[2], ratio)
            self.tensors += 1
            self.worst_rel = max(self.worst_rel, ratio)


def _ratio(got: np.ndarray, want: np.ndarray, tol: Mapping[str, float]) -> float:
    bound = tol["atol"] + tol["rtol"] * np.abs(want)
    return float(np.max(np.abs(got - want) / bound, initial=0.0))


def _check_npz(directory: Path, entry: Mapping[str, Any], result: CheckResult) -> None:
    name, preset = entry["name"], entry.get("preset", "?")
    file = directory / entry["file"]
    if not file.is_file():
        result.failures.append((name, f"missing file {entry['file']}"))
        return
    if _sha256(file) != entry["sha256"]:
        result.failures.append((name, "SHA-256 differs from the manifest (file changed)"))
    try:
        arrays = _read_npz(file)
    except ValueError as err:
        result.failures.append((name, str(err)))
        return
    shapes = {k: list(v.shape) for k, v in arrays.items()}
    if shapes != entry["arrays"]:
        result.failures.append((name, f"keys/shapes {shapes} != manifest {entry['arrays']}"))
        return
    cfg = _config_from_dict(entry["config"])
    params = {k[len("param/") :]: v for k, v in arrays.items() if k.startswith("param/")}
    got = _compute(cfg, arrays["x"], params, arrays["dz"], entry["training"])
    for key in _outputs(arrays):
        want = arrays[key]
        if key not in got or got[key].shape != want.shape:
            result._count(preset, math.inf)
            result.failures.append((name, f"{key}: nlref gives no array of that shape"))
            continue
        ratio = _ratio(got[key], want, entry["tolerances"][key]["float64"])
        result._count(preset, ratio)
        if not ratio <= 1.0:
            result.failures.append(
                (name, f"{key}: max |nlref - file| is {ratio:.3g} x the tolerance")
            )
    for buffer in BUFFERS:
        if f"buffers_after/{buffer}" in arrays and not entry["training"]:
            result.failures.append((name, f"eval-mode case stores {buffer} updates"))


def _check_onnx(directory: Path, entry: Mapping[str, Any], result: CheckResult) -> None:
    from .interop.onnx import _onnx, params_from_onnx

    onnx = _onnx()
    name, preset = entry["name"], entry.get("preset", "?")
    folder = directory / entry["file"]
    for rel, digest in entry["files"].items():
        path = folder / rel
        if not path.is_file():
            result.failures.append((name, f"missing file {entry['file']}/{rel}"))
            return
        if _sha256(path) != digest:
            result.failures.append((name, f"SHA-256 of {rel} differs from the manifest"))
    try:
        model = onnx.load(str(folder / "model.onnx"))
        x, z = (
            onnx.numpy_helper.to_array(onnx.load_tensor(str(folder / ONNX_DATA / f)))
            for f in ("input_0.pb", "output_0.pb")
        )
        cfg = _config_from_dict(entry["config"])
        params = params_from_onnx(model, cfg)
    except Exception as err:  # a truncated or foreign file
        result.failures.append((name, f"cannot read {entry['file']}: {type(err).__name__}: {err}"))
        return
    got, _ = forward(np.asarray(x, np.float64), params, cfg, training=entry["training"])
    ratio = _ratio(np.asarray(got), np.asarray(z, np.float64), entry["tolerances"]["z"]["float32"])
    result._count(preset, ratio)
    if not ratio <= 1.0:
        result.failures.append((name, f"z: max |nlref - file| is {ratio:.3g} x the tolerance"))


def check(directory: str | os.PathLike[str], *, progress: bool | None = None) -> CheckResult:
    """Re-verify a golden-vector directory written by :func:`write`.

    For each case of the manifest: the SHA-256 of its files, its exact set of keys and
    shapes (``.npz``), and every output recomputed by nlref (float64) from the stored
    inputs and parameters, within the manifest's float64 tolerances (``.npz``) or, for
    ONNX folders (whose numbers are float32), its float32 tolerance. ``progress`` shows a
    bar on stderr (None: when stderr is a terminal).

    Raises
    ------
    FileNotFoundError
        If the directory has no manifest.
    ValueError
        If the manifest is not valid JSON, or not one of this format and version. A case
        file that is missing, changed or unreadable is a failure in the result, not an
        exception.
    """
    from .progress import progress as progress_bar

    directory = Path(directory)
    manifest = _read_manifest(directory)
    storage = manifest.get("storage", "npz")
    if storage not in FORMATS:
        raise ValueError(f"{directory / MANIFEST} has storage {storage!r}, not one of {FORMATS}")
    result = CheckResult(storage=storage)
    check_case = _check_npz if storage == "npz" else _check_onnx
    for entry in progress_bar(manifest["cases"], desc="check", unit="case", enabled=progress):
        result._count(entry.get("preset", "?"))
        check_case(directory, entry, result)
    return result
