"""Regenerate the sample outputs of README.md and docs/*.md from the commands that print them.

A sample output is a fenced block right after a marker comment::

    <!-- output: nlref gradcheck --pairwise concatenation --dims 2 -->
    ```
    $ nlref gradcheck --pairwise concatenation --dims 2
    (what the command prints)
    ```

- ``output: CMD`` runs CMD, a command line starting with ``nlref`` (run as
  ``python -m nlref`` by this interpreter) or ``python`` (this interpreter), in an empty
  temporary directory, without a shell. The block becomes ``$ CMD`` followed by what it
  printed on stdout.
- ``output: python`` runs the ```` ```python ```` block just above the marker, and the
  block becomes what it printed.
- Options go in brackets after ``output``, separated by ``;``:
  ``exit=1`` (the exit status the command must end with; 0 by default),
  ``needs=torch,mmcv`` (what it imports beyond nlref's own dependencies: the test skips the
  block where one is missing, unless ``NLREF_REQUIRE`` names it), and ``slow`` (a command
  of more than a few seconds: run only with ``--slow``, never by the test). For example
  ``<!-- output[exit=1; needs=torch,mmcv]: nlref compare --layout mmcv -->``.

Usage::

    python scripts/readme_outputs.py                 # rewrite every marked block
    python scripts/readme_outputs.py docs/oracle.md  # only the blocks of that file
    python scripts/readme_outputs.py --check         # exit 1 if a block differs from what
                                                     # its command prints now
    python scripts/readme_outputs.py --list          # the marked blocks

What depends on the machine is tolerated by ``--check``, and only that: numbers below
1e-6 printed as ``d.de-XX`` (rounding noise: their values depend on the BLAS library and
the CPU, and so does the name that says where the largest of them is, in parentheses or
after a colon right behind it), and durations (``0.1 s``, ``38 ms``). Everything else
must match character for character. ``tests/test_readme_outputs.py`` runs the check.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^<!--\s*output(?:\[(?P<options>[^\]]*)\])?:\s*(?P<command>.+?)\s*-->\s*$")
FENCE = re.compile(r"^(`{3,})(\w*)\s*$")
# a number below 1e-6 as "%.Ne" prints it, and the label of where it is, if one follows
NOISE = re.compile(r"(?<![\w.])\d\.\d+e-(?:0[7-9]|[1-9]\d)\b(?:\s*\([^()]*\)|:\s*[\w.]+)?")
DURATION = re.compile(r"(?<![\w.])\d+(?:\.\d+)?\s?(?:s|ms|µs|us|min)\b")
TIMEOUT = 600


@dataclass(frozen=True)
class Block:
    """One marked sample output: the marker's line and the fenced block after it."""

    path: Path
    command: str
    exit_status: int
    needs: tuple[str, ...]
    slow: bool
    first: int  # index of the line after the opening fence
    stop: int  # index of the closing fence
    text: str  # what the block holds now
    script: str | None = None  # for "output: python": the python block above the marker

    @property
    def where(self) -> str:
        return f"{_name(self.path)}:{self.first - 1} ({self.command})"


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def default_files() -> list[Path]:
    """README.md and the docs."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _options(text: str | None, where: str) -> tuple[int, tuple[str, ...], bool]:
    exit_status, needs, slow = 0, (), False
    for item in filter(None, (part.strip() for part in (text or "").split(";"))):
        key, _, value = item.partition("=")
        if key == "exit" and value.isdigit():
            exit_status = int(value)
        elif key == "needs" and value:
            needs = tuple(v.strip() for v in value.split(",") if v.strip())
        elif key == "slow" and not value:
            slow = True
        else:
            raise ValueError(f"{where}: unknown output option {item!r} (exit=N, needs=A,B, slow)")
    return exit_status, needs, slow


def _fence_end(lines: list[str], first: int, ticks: str, where: str) -> int:
    for i in range(first, len(lines)):
        if lines[i].strip() == ticks:
            return i
    raise ValueError(f"{where}: the fenced block is not closed")


def _python_above(lines: list[str], marker: int, where: str) -> str:
    """The source of the ```python block that ends right above line ``marker``."""
    end = marker - 1
    while end >= 0 and not lines[end].strip():
        end -= 1
    for start in range(end - 1, -1, -1):
        fence = FENCE.match(lines[start])
        if fence and fence.group(2) == "python" and lines[end].strip() == fence.group(1):
            return "\n".join(lines[start + 1 : end]) + "\n"
        if fence:
            break
    raise ValueError(f"{where}: 'output: python' needs a ```python block right above it")


def find_blocks(path: Path) -> list[Block]:
    """The marked sample outputs of a Markdown file, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    for i, line in enumerate(lines):
        marker = MARKER.match(line)
        if not marker:
            continue
        where = f"{path}:{i + 1}"
        fence = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
        if not fence:
            raise ValueError(f"{where}: an output marker must be followed by a fenced block")
        stop = _fence_end(lines, i + 2, fence.group(1), where)
        command = marker.group("command")
        exit_status, needs, slow = _options(marker.group("options"), where)
        script = _python_above(lines, i, where) if command == "python" else None
        text = "\n".join(lines[i + 2 : stop])
        blocks.append(Block(path, command, exit_status, needs, slow, i + 2, stop, text, script))
    return blocks


def _argv(command: str) -> list[str]:
    words = shlex.split(command)
    if words[0] == "nlref":
        return [sys.executable, "-m", "nlref", *words[1:]]
    if words[0] == "python":
        return [sys.executable, *words[1:]]
    raise ValueError(f"a sample output's command must start with nlref or python: {command!r}")


def generate(block: Block) -> str:
    """What the block should hold: run its command now."""
    with tempfile.TemporaryDirectory() as tmp:
        if block.script is not None:
            script = Path(tmp) / "example.py"
            script.write_text(block.script, encoding="utf-8")
            argv, shown = [sys.executable, str(script)], []
        else:
            argv, shown = _argv(block.command), [f"$ {block.command}"]
        env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
        done = subprocess.run(
            argv, cwd=tmp, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
    if done.returncode != block.exit_status:
        raise RuntimeError(
            f"{block.where} exited with {done.returncode}, expected {block.exit_status}:\n"
            f"{done.stderr[-3000:]}"
        )
    printed = [line.rstrip() for line in done.stdout.splitlines()]
    while printed and not printed[-1]:
        printed.pop()
    return "\n".join(shown + printed)


def normalise(text: str) -> str:
    """``text`` with what depends on the machine replaced: rounding noise and durations."""
    return DURATION.sub("<duration>", NOISE.sub("<noise>", text))


def differences(block: Block, fresh: str) -> str:
    """A diff of the block against ``fresh`` where they differ beyond the tolerance, or ''."""
    have, want = normalise(block.text), normalise(fresh)
    if have == want:
        return ""
    diff = difflib.unified_diff(
        block.text.splitlines(), fresh.splitlines(), "in the file", "printed now", lineterm=""
    )
    return "\n".join(diff)


def rewrite(path: Path, blocks: list[Block], fresh: list[str]) -> bool:
    """Put ``fresh`` into the blocks of ``path``; whether the file changed."""
    lines = path.read_text(encoding="utf-8").splitlines()
    for block, text in sorted(zip(blocks, fresh, strict=True), key=lambda b: -b[0].first):
        lines[block.first : block.stop] = text.splitlines()
    new = "\n".join(lines) + "\n"
    if new == path.read_text(encoding="utf-8"):
        return False
    path.write_text(new, encoding="utf-8")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "files", nargs="*", type=Path, help="Markdown files (default: README.md and docs/*.md)"
    )
    parser.add_argument("--check", action="store_true", help="compare only; write nothing")
    parser.add_argument("--slow", action="store_true", help="also run the blocks marked slow")
    parser.add_argument("--list", action="store_true", help="list the marked blocks and exit")
    args = parser.parse_args(argv)
    stale = 0
    for path in [p.resolve() for p in args.files] or default_files():
        blocks = [b for b in find_blocks(path) if args.slow or not b.slow or args.list]
        if args.list:
            for block in blocks:
                print(f"{block.where}{' [slow]' if block.slow else ''}")
            continue
        fresh = [generate(block) for block in blocks]
        if args.check:
            for block, text in zip(blocks, fresh, strict=True):
                diff = differences(block, text)
                if diff:
                    stale += 1
                    print(f"{block.where} is stale:\n{diff}\n", file=sys.stderr)
        elif blocks and rewrite(path, blocks, fresh):
            print(f"rewrote {_name(path)}")
    if stale:
        print(f"{stale} stale block(s): run python scripts/readme_outputs.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
