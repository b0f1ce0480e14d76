"""Nothing in nlref unpickles, and a malformed file gives a clear error naming the file.

Two kinds of check:

1. **The source.** Every module under ``nlref/`` is parsed (with :mod:`ast`, so that a
   call split over several lines or a docstring that mentions pickle changes nothing) and
   must not

   - import ``pickle`` or another module that deserialises Python objects (``_pickle``,
     ``cPickle``, ``cloudpickle``, ``dill``, ``joblib``, ``shelve``, ``marshal``), by
     ``import``, ``from ... import`` or ``importlib.import_module`` / ``__import__``;
   - call ``np.load`` / ``numpy.load`` without ``allow_pickle=False``, or import ``load``
     from NumPy under another name;
   - call ``torch.load`` without ``weights_only=True``;
   - call ``pandas.read_pickle``.

   The scanner itself is tested on snippets that must and must not be flagged.

2. **The loaders.** Every file loader nlref has (``nlref.interop.torch.load_checkpoint``
   and ``from_state_dict``, ``nlref.vectors.check`` and ``load_case``) is given a file
   whose unpickling would create a marker file: the marker must never appear, and the
   loader must fail with an error of a documented class whose message names the file.
   Truncated, empty, garbage and wrong-content files must fail the same way.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import nlref

from .conftest import require

PACKAGE = Path(nlref.__file__).resolve().parent
# torch warns that the test files use a newer pickle protocol than torch.save does
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
UNPICKLERS = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}
NUMPY_NAMES = {"np", "numpy"}


# --- 1. the source ---------------------------------------------------------------------------


def _dotted(node: ast.AST) -> str:
    """``np.lib.format.load`` for the expression of a call's function; "" if not a name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(
        kw.arg == name and isinstance(kw.value, ast.Constant) and kw.value.value is value
        for kw in call.keywords
    )


def unsafe_loads(source: str, filename: str = "<snippet>") -> list[str]:
    """Every unpickling import or call in ``source``, as "file:line: what" strings."""
    problems = []

    def flag(node: ast.AST, what: str) -> None:
        problems.append(f"{filename}:{getattr(node, 'lineno', '?')}: {what}")

    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UNPICKLERS:
                    flag(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            root = (node.module or "").split(".")[0]
            if root in UNPICKLERS:
                flag(node, f"from {node.module} import ...")
            if root == "numpy" and any(a.name == "load" for a in node.names):
                flag(node, "from numpy import load (call np.load(..., allow_pickle=False))")
            if root == "torch" and any(a.name == "load" for a in node.names):
                flag(node, "from torch import load (call torch.load(..., weights_only=True))")
        elif isinstance(node, ast.Call):
            func = _dotted(node.func)
            head, _, last = func.rpartition(".")
            if func in ("importlib.import_module", "import_module", "__import__"):
                first = node.args[0] if node.args else None
                if isinstance(first, ast.Constant) and str(first.value).split(".")[0] in UNPICKLERS:
                    flag(node, f"{func}({first.value!r})")
            elif last == "load" and head in NUMPY_NAMES:
                if not _keyword_is(node, "allow_pickle", False):
                    flag(node, f"{func}(...) without allow_pickle=False")
            elif func == "torch.load":
                if not _keyword_is(node, "weights_only", True):
                    flag(node, "torch.load(...) without weights_only=True")
            elif last == "read_pickle":
                flag(node, f"{func}(...)")
    return problems


def package_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_nothing_in_nlref_unpickles() -> None:
    modules = package_modules()
    assert len(modules) > 10 and PACKAGE / "block.py" in modules
    problems = []
    for path in modules:
        rel = path.relative_to(PACKAGE.parent).as_posix()
        problems += unsafe_loads(path.read_text(encoding="utf-8"), rel)
    assert problems == [], "unpickling code in nlref:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "import pickle as pk",
        "import dill",
        "import joblib.numpy_pickle",
        "from pickle import loads",
        "from shelve import open",
        "import marshal",
        "import importlib\nimportlib.import_module('cloudpickle')",
        "m = __import__('pickle')",
        "import numpy as np\nnp.load('f.npz')",
        "import numpy as np\nnp.load('f.npy', allow_pickle=True)",
        "import numpy\nnumpy.load(\n    'f.npy',\n    mmap_mode='r',\n)",
        "from numpy import load",
        "import torch\ntorch.load('f.pt')",
        "import torch\ntorch.load('f.pt', weights_only=False)",
        "from torch import load",
        "import pandas as pd\npd.read_pickle('f.pkl')",
    ],
)
def test_scanner_flags_unpickling(snippet: str) -> None:
    assert len(unsafe_loads(snippet)) == 1, unsafe_loads(snippet)


@pytest.mark.parametrize(
    "snippet",
    [
        '"""Files load with torch.load(..., weights_only=True); nothing uses pickle."""',
        "import numpy as np\nnp.load('f.npz', allow_pickle=False)",
        "import numpy as np\nwith np.load(\n    path,\n    allow_pickle=False,\n) as f:\n    x = f",
        "import torch\ntorch.load(path, map_location='cpu', weights_only=True)",
        "import json\njson.load(fh)",
        "def load(path):\n    return path\nload('x')",
        "import importlib\nimportlib.import_module('nlref.pairwise.gaussian')",
        "allow_pickle = False",
    ],
)
def test_scanner_accepts_safe_code(snippet: str) -> None:
    assert unsafe_loads(snippet) == []


# --- 2. the loaders ----------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates the file ``path``: proof that something unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def _refused(call: Callable[[], Any]) -> tuple[BaseException | None, str]:
    """Run a loader on a malformed file: it must not accept it. Return (error, message).

    A loader refuses by raising; ``nlref.vectors.check``, which reports every case, may
    instead return a result that is not ok, with the problem among its failures.
    """
    try:
        value = call()
    except Exception as err:
        return err, str(err)
    failures = getattr(value, "failures", None)
    if failures is not None and not getattr(value, "ok", True):
        return None, "; ".join(f"{case}: {problem}" for case, problem in failures)
    pytest.fail(f"a malformed file was accepted: the loader returned {type(value).__name__}")


def _assert_clear_error(call: Callable[[], Any], path: Path, classes: tuple[type, ...]) -> str:
    """``call`` refuses with one of ``classes`` (or a failed check) naming the file."""
    error, message = _refused(call)
    if error is not None:
        assert isinstance(error, classes), f"{type(error).__name__}: {error}"
    assert path.name in message, f"the error does not name the file {path.name}: {message!r}"
    return message


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "UNPICKLED"
    yield path
    assert not path.exists(), "a loader unpickled an arbitrary object"


# checkpoints: nlref.interop.torch


def _checkpoint_loaders() -> dict[str, Callable[[Path], Any]]:
    require("torch")
    from nlref.interop import torch as interop

    return {
        "load_checkpoint": interop.load_checkpoint,
        "from_state_dict": lambda p: interop.from_state_dict(p, layout="timm"),
    }


def _write_checkpoint(kind: str, path: Path, marker: Path) -> None:
    torch = require("torch")
    if kind == "pickled-object":
        torch.save({"t.weight": _Payload(marker)}, path)
    elif kind == "plain-pickle":
        with path.open("wb") as fh:
            pickle.dump({"t.weight": _Payload(marker)}, fh)
    elif kind == "truncated":
        torch.save({"t.weight": torch.zeros(2, 4, 1, 1)}, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"this is not a checkpoint\n" * 10)
    elif kind == "not-a-mapping":
        torch.save([torch.zeros(2)], path)
    else:  # pragma: no cover
        raise AssertionError(kind)


CHECKPOINT_KINDS = [
    "pickled-object",
    "plain-pickle",
    "truncated",
    "empty",
    "garbage",
    "not-a-mapping",
]


@pytest.mark.parametrize("loader", ["load_checkpoint", "from_state_dict"])
@pytest.mark.parametrize("kind", CHECKPOINT_KINDS)
def test_malformed_checkpoint_is_refused_unpickled(
    kind: str, loader: str, tmp_path: Path, marker: Path
) -> None:
    path = tmp_path / f"block-{kind}.pt"
    _write_checkpoint(kind, path, marker)
    load = _checkpoint_loaders()[loader]
    _refused(lambda: load(path))  # and the marker fixture checks that nothing unpickled


@pytest.mark.parametrize("loader", ["load_checkpoint", "from_state_dict"])
@pytest.mark.parametrize("kind", CHECKPOINT_KINDS)
def test_malformed_checkpoint_error_names_the_file(
    kind: str, loader: str, tmp_path: Path, marker: Path
) -> None:
    path = tmp_path / f"block-{kind}.pt"
    _write_checkpoint(kind, path, marker)
    load = _checkpoint_loaders()[loader]
    _assert_clear_error(lambda: load(path), path, (ValueError, TypeError))


@pytest.mark.parametrize("loader", ["load_checkpoint", "from_state_dict"])
def test_missing_checkpoint(loader: str, tmp_path: Path) -> None:
    path = tmp_path / "no-such-checkpoint.pt"
    load = _checkpoint_loaders()[loader]
    _assert_clear_error(lambda: load(path), path, (FileNotFoundError,))


# golden vectors: nlref.vectors


@pytest.fixture(scope="module")
def vectors_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small, valid golden-vector directory (one preset, one variant)."""
    from nlref import vectors

    out = tmp_path_factory.mktemp("vectors")
    manifest = vectors.write(out, presets=["paper"], pairwise=["dot_product"])
    assert manifest["cases"] and vectors.check(out).ok
    return out


def _npz_members(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _spoil_vectors(kind: str, directory: Path, marker: Path) -> Path:
    """Spoil one file of ``directory`` the ``kind`` way; return the spoiled file."""
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    case_file = directory / manifest["cases"][0]["file"]
    if kind == "manifest-not-json":
        manifest_path.write_text("{not json", encoding="utf-8")
        return manifest_path
    if kind == "manifest-no-cases":
        del manifest["cases"]
        manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
        return manifest_path
    if kind == "truncated":
        data = case_file.read_bytes()
        case_file.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        case_file.write_bytes(b"this is not an npz file\n" * 10)
    elif kind == "object-array":  # an array of Python objects: pickled inside the .npy
        arrays = _npz_members(case_file)
        arrays["x"] = np.array([_Payload(marker), None], dtype=object)
        np.savez(case_file, **arrays)
    elif kind == "pickle-member":  # a member that is a bare pickle, not a .npy
        arrays = _npz_members(case_file)
        with zipfile.ZipFile(case_file, "w") as zf:
            for key, value in arrays.items():
                with zf.open(f"{key}.npy", "w") as fh:
                    np.save(fh, value)
            zf.writestr("extra.npy", pickle.dumps(_Payload(marker)))
    else:  # pragma: no cover
        raise AssertionError(kind)
    return case_file


VECTOR_KINDS = [
    "manifest-not-json",
    "manifest-no-cases",
    "truncated",
    "garbage",
    "object-array",
    "pickle-member",
]


def _vectors_call(
    kind: str, loader: str, vectors_dir: Path, tmp_path: Path, marker: Path
) -> tuple[Callable[[], Any], Path]:
    """A spoiled copy of the vectors, and a call of ``loader`` on it."""
    from nlref import vectors

    directory = tmp_path / "spoiled"
    shutil.copytree(vectors_dir, directory)
    manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    name = manifest["cases"][0]["name"]
    spoiled = _spoil_vectors(kind, directory, marker)
    if loader == "check":
        return lambda: vectors.check(directory), spoiled
    return lambda: vectors.load_case(directory, name), spoiled


@pytest.mark.parametrize("loader", ["check", "load_case"])
@pytest.mark.parametrize("kind", VECTOR_KINDS)
def test_malformed_vectors_are_refused_unpickled(
    kind: str, loader: str, vectors_dir: Path, tmp_path: Path, marker: Path
) -> None:
    call, _ = _vectors_call(kind, loader, vectors_dir, tmp_path, marker)
    _refused(call)  # and the marker fixture checks that nothing unpickled


@pytest.mark.parametrize("loader", ["check", "load_case"])
@pytest.mark.parametrize("kind", VECTOR_KINDS)
def test_malformed_vectors_error_names_the_file(
    kind: str, loader: str, vectors_dir: Path, tmp_path: Path, marker: Path
) -> None:
    call, spoiled = _vectors_call(kind, loader, vectors_dir, tmp_path, marker)
    _assert_clear_error(call, spoiled, (ValueError,))


def test_vectors_without_manifest(tmp_path: Path) -> None:
    from nlref import vectors

    _assert_clear_error(
        lambda: vectors.check(tmp_path), tmp_path / "manifest.json", (FileNotFoundError,)
    )


def test_marker_payload_really_unpickles(tmp_path: Path) -> None:
    """The payload is live: plain pickle.loads of it creates the marker (so its absence above
    means nothing was unpickled)."""
    path = tmp_path / "UNPICKLED"
    pickle.loads(pickle.dumps(_Payload(path)))
    assert path.exists()
    os.remove(path)
