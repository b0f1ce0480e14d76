"""Rebuild each notebook's .ipynb from its .py (jupytext percent format), outputs stripped.

The .py files are the ones to edit and review; the .ipynb files are what Jupyter opens.
Run this after editing a .py (or after saving a notebook in Jupyter with jupytext, to
drop its outputs)::

    python notebooks/sync.py                          # every NN_*.py in notebooks/
    python notebooks/sync.py notebooks/03_attention_maps.py   # just that one
    python notebooks/sync.py --check                  # exit 1 if an .ipynb is stale or
                                                      # has outputs

Cell ids are kept where the cell at the same position has the same type, so a one-cell
edit is a one-cell diff. ``tests/test_notebooks.py`` runs the check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def notebook_pairs(folder: Path = HERE) -> list[tuple[Path, Path]]:
    """(script.py, notebook.ipynb) for every numbered notebook script in ``folder``."""
    return [(py, py.with_suffix(".ipynb")) for py in sorted(folder.glob("[0-9][0-9]_*.py"))]


def build(py: Path, ipynb: Path):
    """The notebook that ``py`` describes, with the cell ids of an existing ``ipynb``."""
    import jupytext
    import nbformat

    nb = jupytext.read(py)
    old = nbformat.read(ipynb, as_version=4) if ipynb.exists() else None
    for i, cell in enumerate(nb.cells):
        if old is not None and i < len(old.cells) and old.cells[i].cell_type == cell.cell_type:
            cell["id"] = old.cells[i].get("id", cell.get("id"))
        else:
            cell["id"] = f"{py.stem[:2]}-{i:03d}"
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata = {}
    return nb


def problems(py: Path, ipynb: Path) -> list[str]:
    """What is wrong with the pair: a missing or stale .ipynb, outputs kept in it."""
    import jupytext
    import nbformat

    if not ipynb.exists():
        return [f"{ipynb.name} is missing: run python notebooks/sync.py"]
    nb = nbformat.read(ipynb, as_version=4)
    found = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None):
            found.append(f"{ipynb.name} cell {i} has outputs: run python notebooks/sync.py")
            break
    script = jupytext.read(py)
    want = [(c.cell_type, c.source) for c in script.cells]
    have = [(c.cell_type, c.source) for c in nb.cells]
    if want != have:
        found.append(
            f"{ipynb.name} and {py.name} differ: edit the .py (or sync from Jupyter) and run "
            "python notebooks/sync.py"
        )
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scripts", nargs="*", type=Path, help="NN_name.py files (default all)")
    parser.add_argument("--check", action="store_true", help="only report, write nothing")
    args = parser.parse_args(argv)
    import nbformat

    pairs = [(p.resolve(), p.resolve().with_suffix(".ipynb")) for p in args.scripts]
    bad = []
    for py, ipynb in pairs or notebook_pairs():
        if args.check:
            bad += problems(py, ipynb)
            continue
        nbformat.write(build(py, ipynb), ipynb)
        print(f"wrote {ipynb.relative_to(HERE.parent)}")
    for line in bad:
        print(line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
