"""The sample outputs in README.md and docs/*.md are what their commands print now.

Each marked block (``<!-- output: CMD -->``, see ``scripts/readme_outputs.py``) is run and
compared, tolerating only rounding noise and durations; a stale block fails with a diff
and the command that regenerates it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from .conftest import require

ROOT = Path(__file__).resolve().parent.parent


def _script():
    path = ROOT / "scripts" / "readme_outputs.py"
    spec = importlib.util.spec_from_file_location("readme_outputs", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


outputs = _script()
BLOCKS = [b for path in outputs.default_files() for b in outputs.find_blocks(path)]
CHECKED = [b for b in BLOCKS if not b.slow]


def test_the_readme_marks_its_sample_outputs():
    commands = {b.command for b in BLOCKS if b.path.name == "README.md"}
    assert "python" in commands  # the gradcheck failure example
    assert any(c.startswith("nlref gradcheck") for c in commands)


@pytest.mark.parametrize("block", CHECKED, ids=[b.where for b in CHECKED])
def test_sample_output_is_current(block):
    for name in block.needs:
        require(name)
    diff = outputs.differences(block, outputs.generate(block))
    assert not diff, f"{block.where} is stale; run python scripts/readme_outputs.py\n{diff}"


# ─── The mechanism ────────────────────────────────────────────────────────────────────────


def test_noise_and_durations_are_tolerated_and_nothing_else():
    a = "3 cases in 0.1 s, worst max rel err 1.4e-07 (z.b, S=5x6): PASS\nw  5.00e-01  ok"
    b = "3 cases in 2.5 s, worst max rel err 7.9e-08 (g.b, S=5x6): PASS\nw  5.00e-01  ok"
    assert outputs.normalise(a) == outputs.normalise(b)
    assert outputs.normalise("worst 4.1e-15: theta.weight") == outputs.normalise(
        "worst 2.0e-15: dx"
    )
    assert outputs.normalise(a) != outputs.normalise(a.replace("5.00e-01", "5.01e-01"))
    assert outputs.normalise(a) != outputs.normalise(a.replace("PASS", "FAIL"))
    assert outputs.normalise(a) != outputs.normalise(a.replace("1.4e-07", "1.4e-06"))
    assert outputs.normalise("rtol 1e-05, atol 1e-07") == "rtol 1e-05, atol 1e-07"


def test_a_stale_block_is_found_and_rewritten(tmp_path, capsys):
    doc = tmp_path / "doc.md"
    doc.write_text(
        "Text.\n\n```python\nprint('a', 3 * 7)\nprint('err 1.5e-09 (x)')\n```\n\n"
        "<!-- output: python -->\n```\na 20\n```\n\n"
        "<!-- output[exit=3]: python -c \"import sys; print('bye'); sys.exit(3)\" -->\n"
        "```\n```\n",
        encoding="utf-8",
    )
    assert outputs.main(["--check", str(doc)]) == 1
    assert "a 20" in capsys.readouterr().err
    assert outputs.main([str(doc)]) == 0
    text = doc.read_text(encoding="utf-8")
    assert "```\na 21\nerr 1.5e-09 (x)\n```" in text
    assert "```\n$ python -c \"import sys; print('bye'); sys.exit(3)\"\nbye\n```" in text
    assert outputs.main(["--check", str(doc)]) == 0
    doc.write_text(text.replace("1.5e-09 (x)", "3.0e-10 (y)"), encoding="utf-8")
    assert outputs.main(["--check", str(doc)]) == 0  # rounding noise only


def test_a_command_that_fails_is_an_error(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text('<!-- output: python -c "raise SystemExit(2)" -->\n```\n```\n')
    with pytest.raises(RuntimeError, match="exited with 2, expected 0"):
        outputs.generate(outputs.find_blocks(doc)[0])
    doc.write_text("<!-- output[colour=red]: nlref --version -->\n```\n```\n")
    with pytest.raises(ValueError, match="unknown output option"):
        outputs.find_blocks(doc)
