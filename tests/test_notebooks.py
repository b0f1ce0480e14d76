"""The notebooks: paired with their .py, outputs stripped, the expected structure, a
kernel that is this interpreter, and no source code pasted into them (or into the docs).

nbmake executes every ``notebooks/*.ipynb`` as a test of its own (``--nbmake`` and
``testpaths`` in pyproject.toml); this file checks what nbmake does not.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import io
import os
import re
import sys
import tokenize
from pathlib import Path

import pytest

from .conftest import require

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
EXPECTED = ["01_forward", "02_backward", "03_attention_maps", "04_toy_task", "05_oracle"]
EXPECTED += ["06_family"]


def _sync():
    spec = importlib.util.spec_from_file_location("nb_sync", NOTEBOOKS / "sync.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PAIRS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))


def test_the_notebooks_exist():
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


# ─── No pasted source ─────────────────────────────────────────────────────────────────────
# Notebooks and docs show nlref's code by inspect.getsource (in a notebook) or by naming the
# file and function, never by a copy, which would drift from the code. The check: no line
# of a notebook or doc equals a line of code of the modules they explain, and no inline
# `code` span of theirs is a piece of such a line with an operator in it. Lines that
# only call the public API (as demo and command modules do) are not in the set.

EXPLAINED = ["block.py", "checks.py", "gradcheck.py", "params.py", "sampling.py", "_backend.py"]
EXPLAINED += ["layers", "pairwise", "engine", "demo/layers", "family"]
MIN_LINE = 30  # shorter lines (imports, `xp = namespace(x)`) are common to any code
MIN_SPAN = 25
OPERATORS = (" = ", " + ", " - ", " * ", " / ", " @ ")
SPAN = re.compile(r"`([^`\n]+)`")


def _squash(text: str) -> str:
    return " ".join(text.split())


def code_lines(path: Path) -> set[str]:
    """The lines of code of a module, comments cut and whitespace squashed; docstrings and
    lines shorter than MIN_LINE are left out."""
    text = path.read_text(encoding="utf-8")
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(text)):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = body[0] if body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.update(range(first.lineno, first.end_lineno + 1))
    comment_at = {
        tok.start[0]: tok.start[1]
        for tok in tokenize.generate_tokens(io.StringIO(text).readline)
        if tok.type == tokenize.COMMENT
    }
    lines = set()
    for number, line in enumerate(text.splitlines(), 1):
        if number not in docstrings:
            code = _squash(line[: comment_at.get(number, len(line))])
            if len(code) >= MIN_LINE:
                lines.add(code)
    return lines


@functools.cache
def explained_source() -> frozenset[str]:
    lines: set[str] = set()
    for name in EXPLAINED:
        path = ROOT / "nlref" / name
        for module in [path] if path.is_file() else sorted(path.rglob("*.py")):
            lines |= code_lines(module)
    return frozenset(lines)


def pasted(text: str, source: frozenset[str]) -> list[str]:
    """The lines and inline code spans of ``text`` that copy a line of ``source``."""
    found = []
    for line in text.splitlines():
        without_comment = re.sub(r"\s+#\s.*$", "", line)
        if {_squash(line), _squash(without_comment)} & source:
            found.append(line.strip())
            continue
        for span in SPAN.findall(line):
            span = _squash(span)
            if len(span) >= MIN_SPAN and any(op in span for op in OPERATORS):
                if any(span in code for code in source):
                    found.append(f"`{span}`")
    return found


def notebook_text(script: Path) -> str:
    """The notebook's cells, but those that print source with inspect.getsource."""
    import jupytext

    cells = jupytext.read(script).cells
    return "\n".join(c.source for c in cells if "getsource(" not in c.source)


DOCS = [ROOT / "README.md", NOTEBOOKS / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("script", PAIRS, ids=[p.stem for p in PAIRS])
def test_notebook_shows_source_by_getsource_not_by_copy(script):
    require("jupytext")
    copies = pasted(notebook_text(script), explained_source())
    assert not copies, (
        f"{script.name} copies nlref source (show it with inspect.getsource instead):\n"
        + "\n".join(copies)
    )


@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_doc_names_source_instead_of_copying_it(doc):
    copies = pasted(doc.read_text(encoding="utf-8"), explained_source())
    assert not copies, (
        f"{doc.relative_to(ROOT)} copies nlref source (name the function instead):\n"
        + "\n".join(copies)
    )


def test_the_copy_check_finds_a_copy(tmp_path):
    """The check above is not vacuous: a line of nlref.block.backward pasted into a
    notebook cell, or quoted in a doc, is found; in a cell that prints the source with
    inspect.getsource it is not."""
    require("jupytext")
    import inspect

    from nlref import block

    source = explained_source()
    assert len(source) > 200
    lines = [s.strip() for s in inspect.getsource(block.backward).splitlines()]
    line = next(s for s in lines if s.startswith("dx = ") and "dx_g" in s)
    expression = _squash(line.split("#")[0].split(" = ", 1)[1])
    assert pasted(f"y = 1\n    {line}\n", source) == [line]
    assert pasted(f"the sum is `{expression}` here", source) == [f"`{expression}`"]
    assert pasted("`cache.attention_rows(start, stop)` is an API call", source) == []

    shown = f"# %%\nprint(inspect.getsource(block.backward))\n{line}\n"
    script = tmp_path / "99_test.py"
    script.write_text(shown, encoding="utf-8")
    assert pasted(notebook_text(script), source) == []
    script.write_text(f"{shown}\n# %%\nx = 1\n{line}\n", encoding="utf-8")
    assert pasted(notebook_text(script), source) == [line]
