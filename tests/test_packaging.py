"""What a user expects around the package: type hints shipped, the notebooks' extra and
command, skip reasons in the test summary."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
OPEN_NOTEBOOKS = 'pip install -e ".[notebooks]" && jupyter lab notebooks/'


def _section(name: str) -> str:
    """The body of one [table] of pyproject.toml."""
    match = re.search(rf"^\[{re.escape(name)}\]\n(.*?)(?=^\[|\Z)", PYPROJECT, re.M | re.S)
    assert match, f"pyproject.toml has no [{name}]"
    return match.group(1)


def test_the_package_ships_py_typed():
    assert (ROOT / "nlref" / "py.typed").is_file()
    assert re.search(r'^nlref = \["py.typed"\]$', _section("tool.setuptools.package-data"), re.M)


def test_the_notebooks_extra_installs_jupyterlab_and_the_docs_say_how_to_open_them():
    extra = re.search(r"^notebooks = \[(.*?)\]", _section("project.optional-dependencies"), re.M)
    assert extra and re.search(r'"jupyterlab==\d', extra.group(1))
    assert OPEN_NOTEBOOKS in (ROOT / "README.md").read_text(encoding="utf-8")
    assert OPEN_NOTEBOOKS in (ROOT / "notebooks" / "README.md").read_text(encoding="utf-8")


def test_the_test_summary_gives_skip_reasons():
    addopts = re.search(r'^addopts = "(.*)"', _section("tool.pytest.ini_options"), re.M)
    chars = re.findall(r"-r(\w+)", addopts.group(1))[-1]  # the last -r wins
    assert {"f", "E", "s"} <= set(chars)
