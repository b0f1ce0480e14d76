"""The notebooks: paired with their .py, outputs stripped, the expected structure, and a
kernel that is this interpreter.

nbmake executes every ``notebooks/*.ipynb`` as a test of its own (``--nbmake`` and
``testpaths`` in pyproject.toml); this file checks what nbmake does not.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from .conftest import require

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
EXPECTED = ["01_forward", "02_backward", "03_attention_maps", "04_toy_task"]


def _sync():
    spec = importlib.util.spec_from_file_location("nb_sync", NOTEBOOKS / "sync.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PAIRS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))


def test_the_four_notebooks_exist():
    names = {p.stem for p in PAIRS}
    assert set(EXPECTED) <= names, f"missing notebooks: {sorted(set(EXPECTED) - names)}"


@pytest.mark.parametrize("script", PAIRS, ids=[p.stem for p in PAIRS])
def test_ipynb_is_the_stripped_twin_of_its_py(script):
    """Diff-friendly: the .ipynb has no outputs and the same cells as its .py."""
    require("jupytext")
    problems = _sync().problems(script, script.with_suffix(".ipynb"))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("script", PAIRS, ids=[p.stem for p in PAIRS])
def test_opens_with_what_you_will_learn_and_ends_with_exercises(script):
    require("jupytext")
    import jupytext

    cells = jupytext.read(script).cells
    assert cells[0].cell_type == "markdown" and "What you will learn" in cells[0].source
    assert cells[-1].cell_type == "markdown" and "## Exercises" in cells[-1].source


@pytest.mark.parametrize("script", PAIRS, ids=[p.stem for p in PAIRS])
def test_declares_the_python3_kernel(script):
    require("jupytext")
    import jupytext

    assert jupytext.read(script).metadata["kernelspec"]["name"] == "python3"


def test_python3_kernel_is_this_interpreter():
    """nbmake starts the kernel named in each notebook (python3). jupyter_client finds it in
    JUPYTER_PATH, then the user's data dir, then this environment's share/jupyter (where
    ipykernel installs it, with argv[0] = "python", which jupyter_client replaces by
    sys.executable). A python3 kernelspec of another Python found earlier would run the
    notebooks without this nlref."""
    require("jupytext")
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    exe = spec.argv[0]
    replaced = {
        "python",
        f"python{sys.version_info[0]}",
        "python{}.{}".format(*sys.version_info[:2]),
    }
    same = exe in replaced or (os.path.exists(exe) and os.path.samefile(exe, sys.executable))
    assert same, (
        f"the python3 kernel runs {exe!r} (from {spec.resource_dir}), not {sys.executable}; "
        f"run `{sys.executable} -m ipykernel install --sys-prefix` or remove that kernelspec"
    )
