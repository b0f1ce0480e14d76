"""Every subcommand, driven with bad flag values: a usage error is exit 2 and one line.

A flag's bad value must never show a traceback, never run work first and fail later, and
never look like a failed check (exit 1). Each case below runs ``nlref.cli.main`` in
process and asserts exit status 2 and exactly one line on stderr, ``nlref <command>:
error: ...``, naming the flag. Nothing is printed on stdout, except by the commands that
refuse a problem too large for its estimate: they print the estimate first.
"""

from __future__ import annotations

import sys

import pytest

from nlref.cli import main

from .conftest import require

SAMPLE = "SAMPLE_PHOTO"  # replaced by the path of matplotlib's sample photo

# (command line, text the one line must contain)
CASES = [
    # gradcheck
    (["gradcheck", "--seed", "-1"], "--seed"),
    (["gradcheck", "--rtol", "0"], "--rtol"),
    (["gradcheck", "--rtol", "-1"], "--rtol"),
    (["gradcheck", "--atol", "-1e-9"], "--atol"),
    (["gradcheck", "--dims", "4"], "--dims"),
    (["gradcheck", "--pairwise", "cosine"], "--pairwise"),
    (["gradcheck", "--seed", "x"], "--seed"),
    # compare
    (["compare", "--layout", "mmcv", "--spatial", "1", "1", "--sub-sample"], "--spatial"),
    (["compare", "--layout", "mmcv", "--channels", "0"], "--channels"),
    (
        ["compare", "--layout", "mmcv", "--batch", "1", "--spatial", "1", "1", "--norm", "bn"],
        "--batch",
    ),
    (["compare", "--layout", "mmcv", "--rtol", "-1"], "--rtol"),
    (["compare", "--layout", "mmcv", "--spatial", "0", "3"], "--spatial"),
    (["compare", "--layout", "mmcv", "--dtype", "int8"], "--dtype"),
    # demo
    (["demo", "--dpi", "0"], "--dpi"),
    # bench
    (["bench", "--threads", "0"], "--threads"),
    (["bench", "--repeats", "0"], "--repeats"),
    (["bench", "--case", "nope"], "nope"),
    # attention
    (["attention", SAMPLE, "--query", "-5,3"], "query -5,3"),
    (["attention", SAMPLE, "--query", "5"], "Y,X"),
    (
        ["attention", SAMPLE, "--query", "5,5", "--pairwise", "concatenation", "--scale", "2"],
        "--scale",
    ),
    (["attention", SAMPLE, "--query", "5,5", "--size", "1"], "--size"),
    (["attention", SAMPLE, "--query", "5,5", "--size", "2000"], "--size 2000"),
    (["attention", SAMPLE, "--query", "5,5", "--dpi", "0"], "--dpi"),
    (["attention", "no/such/image.png", "--query", "5,5"], "no/such/image.png"),
    (  # a negative number in exponent form is a value, not an option
        ["attention", SAMPLE, "--query", "5,5", "--position-weight", "-1e-3"],
        "--position-weight must be >= 0",
    ),
    # explore
    (["explore", "--sample", "--size", "2000"], "--size 2000"),
    (["explore", "--sample", "--out", "x.png"], "--out"),
    (["explore", "--sample", "--pairwise", "concatenation", "--scale", "2"], "--scale"),
    (["explore"], "--sample"),
    (["explore", "--sample", "--position-weight", "-1e-3"], "--position-weight must be >= 0"),
    # vectors
    (["vectors"], "--out"),
    (["vectors", "--check", "no/such/dir"], "no/such/dir"),
    (["vectors", "--out", "VECTORS", "--format", "tflite"], "--format"),
]


def _ids(case: tuple[list[str], str]) -> str:
    return " ".join(case[0][:2] + [a for a in case[0][2:] if a.startswith("--")])


@pytest.mark.parametrize(("argv", "needle"), CASES, ids=[_ids(c) for c in CASES])
def test_bad_value_is_one_line_and_exit_2(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str], tmp_path, monkeypatch
) -> None:
    if SAMPLE in argv or argv[0] in ("demo", "explore"):
        require("matplotlib")
    if argv[0] == "compare":
        require("torch")
        require("mmcv")
    if SAMPLE in argv:
        from nlref.demo.photo import sample_photo_path

        argv = [str(sample_photo_path()) if a == SAMPLE else a for a in argv]
    argv = [str(tmp_path / "vectors") if a == "VECTORS" else a for a in argv]
    monkeypatch.chdir(tmp_path)  # anything a command might write stays here
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, f"exit {code}; stderr:\n{err}"
    if "--size 2000" in needle:  # refused after its estimate, which is printed
        assert "estimate" in out, out
    else:
        assert out == "", f"a usage error printed on stdout:\n{out}"
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith(f"nlref {argv[0]}: error: ") or lines[0].startswith(
        "nlref: error: "
    ), lines[0]
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err
