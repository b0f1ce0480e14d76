"""``nlref attention`` and ``nlref demo``: files written, paths printed, usage errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nlref import cli

from .conftest import require


@pytest.fixture(autouse=True)
def _matplotlib():
    require("matplotlib")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def written(out: str) -> list[Path]:
    return [Path(line.split("wrote ", 1)[1]) for line in out.splitlines() if "wrote " in line]


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    from PIL import Image

    yy, xx = np.mgrid[0:60, 0:80]
    rgb = np.stack([xx * 3, yy * 4, 255 - xx * 3], axis=-1).astype(np.uint8)
    rgb[10:20, 60:70] = (250, 20, 20)  # two red squares, far apart
    rgb[45:55, 5:15] = (250, 20, 20)
    paths = {"png": tmp_path / "pic.png", "jpg": tmp_path / "pic.jpg"}
    Image.fromarray(rgb).save(paths["png"])
    Image.fromarray(rgb).save(paths["jpg"], quality=95)
    return paths


@pytest.mark.parametrize("kind", ["png", "jpg"])
def test_attention_writes_a_png(capsys, images, tmp_path, kind):
    out_png = tmp_path / "map.png"
    code, out, err = run(
        capsys,
        "attention",
        str(images[kind]),
        "--query",
        "15,65",
        "--query",
        "2,2",
        "--out",
        str(out_png),
        "--size",
        "20",
    )
    assert code == 0, err
    assert written(out) == [out_png]
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    assert "60x80 pixels -> grid 15x20" in out
    # the query on one red square peaks on a red square (either one)
    line = next(s for s in out.splitlines() if "query 15,65" in s)
    peak = tuple(int(v) for v in line.split("at key cell ")[1].split(",")[:2])
    assert peak in {(r, c) for r in range(2, 5) for c in range(15, 18)} | {
        (r, c) for r in range(11, 14) for c in range(1, 4)
    }


def test_attention_all_variants_one_file_per_query(capsys, images, tmp_path):
    out_png = tmp_path / "cmp.png"
    code, out, err = run(
        capsys,
        "attention",
        str(images["png"]),
        "--query",
        "15,65",
        "--query",
        "50,10",
        "--pairwise",
        "all",
        "--out",
        str(out_png),
        "--size",
        "16",
        "--sub-sample",
        "2",
    )
    assert code == 0, err
    assert written(out) == [tmp_path / "cmp_1.png", tmp_path / "cmp_2.png"]
    for name in ("gaussian", "embedded_gaussian", "dot_product", "concatenation"):
        assert name in out


def test_attention_default_out_is_next_to_the_cwd(capsys, images, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "attention", str(images["png"]), "--query", "1,1", "--size", "8")
    assert code == 0
    assert written(out) == [Path("pic_attention.png")]
    assert (tmp_path / "pic_attention.png").is_file()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--query", "60,0"], "outside the image"),
        (["--query", "1,1", "--out", "x.jpg"], "must end in .png"),
        (["--query", "1,1", "--size", "1"], "--size"),
        (["--query", "1,1", "--scale", "0"], "--scale"),
        (["--query", "1,1", "--sub-sample", "99"], "larger than the grid"),
    ],
)
def test_attention_usage_errors(capsys, images, args, match):
    code, _, err = run(capsys, "attention", str(images["png"]), *args)
    assert code == 2
    assert match in err


def test_attention_bad_query_and_bad_file(capsys, images, tmp_path):
    code, _, err = run(capsys, "attention", str(images["png"]), "--query", "1;2")
    assert code == 2 and "expected Y,X" in err
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    code, _, err = run(capsys, "attention", str(bad), "--query", "1,1")
    assert code == 2 and "cannot read" in err
    code, _, err = run(capsys, "attention", str(tmp_path / "none.png"), "--query", "1,1")
    assert code == 2 and "no image file" in err


def test_attention_without_matplotlib_says_what_to_install(capsys, images, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, _, err = run(capsys, "attention", str(images["png"]), "--query", "1,1")
    assert code == 2
    assert "nlref[viz]" in err


def test_demo_runs_the_tour(capsys, tmp_path):
    """The README's main job: gradient-check table, then the figures, paths printed."""
    code, out, err = run(capsys, "demo", "--out", str(tmp_path / "tour"))
    assert code == 0, out + err
    assert "gradient checks" in out and "PASS" in out
    for name in ("gaussian", "embedded_gaussian", "dot_product", "concatenation"):
        assert name in out  # one table row per variant
    paths = written(out)
    assert [p.name for p in paths] == [
        "photo_attention.png",
        "pairwise_comparison.png",
        "clip_attention.png",
        "attention_matrix.png",
    ]
    for p in paths:
        assert p.parent == tmp_path / "tour"
        assert p.read_bytes()[:4] == b"\x89PNG" and p.stat().st_size > 10_000
    assert "--toy" in out  # it says how to get the toy task


def test_demo_without_matplotlib_fails_clearly(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = run(capsys, "demo", "--out", str(tmp_path))
    assert code == 2
    assert "pip install 'nlref[viz]'" in err


def test_demo_help_through_the_console_script():
    done = subprocess.run(
        [sys.executable, "-m", "nlref", "demo", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "--out" in done.stdout and "--toy" in done.stdout
