"""``nlref attention`` and ``nlref demo``: files written, paths printed, usage errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import require, run_cli


@pytest.fixture(autouse=True)
def _matplotlib():
    require("matplotlib")


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
    code, out, err = run_cli(
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
    assert "estimate: 1 forward of N x N' = 300 x 300" in out
    # the query on one red square peaks on a red square (either one)
    line = next(s for s in out.splitlines() if "query 15,65" in s)
    peak = tuple(int(v) for v in line.split("at key cell ")[1].split(" ")[0].split(","))
    assert peak in {(r, c) for r in range(2, 5) for c in range(15, 18)} | {
        (r, c) for r in range(11, 14) for c in range(1, 4)
    }


def test_attention_all_variants_one_file_per_query(capsys, images, tmp_path):
    out_png = tmp_path / "cmp.png"
    code, out, err = run_cli(
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
    # key cells are on the pooled grid, and the output says so
    assert "(keys pooled 2x2: 6x8)" in out and "of the pooled 6x8 key grid" in out
    assert "scale α = 6 (not used by concatenation)" in out


def test_attention_default_out_is_next_to_the_cwd(capsys, images, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(capsys, "attention", str(images["png"]), "--query", "1,1", "--size", "8")
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
        (["--query", "-5,3"], "query -5,3 lies outside the image"),
        (["--query", "5,-3", "--query", "1,1"], "query 5,-3 lies outside the image"),
        (
            ["--query", "1,1", "--pairwise", "concatenation", "--scale", "2"],
            "pairwise='concatenation' has no θᵢᵀφⱼ term for a scale to multiply",
        ),
        (["--query", "1,1", "--dpi", "0"], "--dpi must be >= 1"),
    ],
)
def test_attention_usage_errors(capsys, images, args, match):
    code, out, err = run_cli(capsys, "attention", str(images["png"]), *args)
    assert code == 2
    assert match in err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback
    assert "wrote" not in out


def test_attention_scale_goes_to_the_variants_that_take_one(capsys, images, tmp_path):
    out_png = tmp_path / "s.png"
    args = ["--query", "1,1", "--size", "8", "--out", str(out_png), "--quiet"]
    code, out, err = run_cli(capsys, "attention", str(images["png"]), *args, "--scale", "2")
    assert code == 0, err
    assert "scale α = 2" in out
    code, out, err = run_cli(
        capsys, "attention", str(images["png"]), *args, "--pairwise", "concatenation"
    )
    assert code == 0, err
    assert "no scale" in out


def test_attention_of_a_tiled_forward(capsys, tmp_path):
    """N = 6400: the float64 attention (330 MB) is above what the forward holds, so the
    engine evaluates it in tiles, and the rows of the queries are recomputed from the
    cache (this used to fail with AttentionNotStoredError)."""
    from PIL import Image

    yy, xx = np.mgrid[0:80, 0:80]
    rgb = np.stack([xx * 3, yy * 3, 255 - xx * 3], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "big.png")
    args = ["--query", "40,40", "--size", "80", "--out", str(tmp_path / "b.png"), "--quiet"]
    code, out, err = run_cli(capsys, "attention", str(tmp_path / "big.png"), *args)
    assert code == 0, err
    assert "N=6400, N'=6400" in out
    line = next(s for s in out.splitlines() if "query 40,40" in s)
    assert "sum 1.000" in line
    assert written(out) == [tmp_path / "b.png"]


def test_attention_refuses_huge_inputs_up_front(capsys, tmp_path):
    """--size 2000 on a 600x512 photo: 9.4e10 pairs, refused from the shapes alone (no
    pixel is read, no forward runs); the message says what to change."""
    import time

    from PIL import Image

    Image.new("RGB", (512, 600), (30, 60, 90)).save(tmp_path / "photo.jpg")
    start = time.perf_counter()
    code, out, err = run_cli(
        capsys, "attention", str(tmp_path / "photo.jpg"), "--query", "1,1", "--size", "2000"
    )
    seconds = time.perf_counter() - start
    print(f"refused in {seconds:.2f} s")  # measured, not asserted: see the README
    assert code == 2
    assert "9.4e+10 query-key pairs" in err and "about 16 min" in err
    assert "--size 300 or less" in err and "--sub-sample 2" in err and "--force" in err
    assert "estimate: 1 forward" in out and "wrote" not in out


def test_attention_bad_query_and_bad_file(capsys, images, tmp_path):
    code, _, err = run_cli(capsys, "attention", str(images["png"]), "--query", "1;2")
    assert code == 2 and "expected Y,X" in err
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    code, _, err = run_cli(capsys, "attention", str(bad), "--query", "1,1")
    assert code == 2 and "cannot read" in err
    code, _, err = run_cli(capsys, "attention", str(tmp_path / "none.png"), "--query", "1,1")
    assert code == 2 and "no image file" in err


def test_attention_without_matplotlib_says_what_to_install(capsys, images, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, _, err = run_cli(capsys, "attention", str(images["png"]), "--query", "1,1")
    assert code == 2
    assert "nlref[viz]" in err


def test_demo_runs_the_tour(capsys, tmp_path):
    """The README's main job: gradient-check table, then the figures, paths printed."""
    code, out, err = run_cli(capsys, "demo", "--out", str(tmp_path / "tour"))
    assert code == 0, out + err
    assert "gradient checks" in out and "PASS" in out
    for name in ("gaussian", "embedded_gaussian", "dot_product", "concatenation"):
        assert name in out  # one table row per variant
    assert max(len(line) for line in out.splitlines()) <= 100
    table = out.split("worst rel err")[0].splitlines()[-1]
    assert table.split() == ["pairwise", "S", "pool", "order", "tensors"]
    assert "'worst rel err' is the largest relative error" in out  # the cells explained
    assert err == ""  # no progress bar where stderr is not a terminal
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


@pytest.mark.parametrize("dpi", ["0", "-3", "5000"])
def test_demo_bad_dpi_is_a_usage_error_before_any_work(capsys, tmp_path, dpi):
    code, out, err = run_cli(capsys, "demo", "--out", str(tmp_path / "never"), "--dpi", dpi)
    assert code == 2
    assert err.strip() == f"nlref demo: error: --dpi must be between 1 and 1000, got {dpi}"
    assert out == "" and not (tmp_path / "never").exists()


def test_demo_without_matplotlib_fails_clearly(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = run_cli(capsys, "demo", "--out", str(tmp_path))
    assert code == 2
    assert "pip install 'nlref[viz]'" in err


def test_demo_help_through_the_console_script():
    done = subprocess.run(
        [sys.executable, "-m", "nlref", "demo", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "--out" in done.stdout and "--toy" in done.stdout


# ----------------------------------------------------------------------- nlref explore


def test_explore_an_image_file(capsys, images, tmp_path):
    out_html = tmp_path / "page.html"
    code, out, err = run_cli(
        capsys, "explore", str(images["jpg"]), "--size", "16", "--out", str(out_html)
    )
    assert code == 0, err
    assert written(out) == [out_html]
    html = out_html.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and "window.nlref" in html
    assert "query grid 12x16" in out and "estimate: 4 forwards" in out
    assert "query dependence" in out and "concatenation" in out


def test_explore_the_sample_photo_and_the_clip(capsys, tmp_path):
    for source, grid in ((["--sample", "--size", "12"], "12x10"), (["--clip"], "6x24x24")):
        out_html = tmp_path / f"{source[0][2:]}.html"
        code, out, err = run_cli(
            capsys, "explore", *source, "--sub-sample", "2", "--pairwise", "gaussian",
            "--out", str(out_html),
        )  # fmt: skip
        assert code == 0, err
        assert f"query grid {grid}" in out and written(out) == [out_html]
    assert "key grid 6x12x12 (pooled 1x2x2)" in out


def test_explore_a_npy_clip(capsys, tmp_path):
    from nlref.demo import photo

    clip, _ = photo.synthetic_clip(frames=3, size=16)
    np.save(tmp_path / "frames.npy", clip)
    code, out, err = run_cli(
        capsys, "explore", str(tmp_path / "frames.npy"), "--pairwise", "dot_product",
        "--out", str(tmp_path / "f.html"),
    )  # fmt: skip
    assert code == 0, err
    assert "query grid 3x16x16" in out


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ([], "give one of: an IMAGE file"),
        (["--clip", "--sample"], "give one of"),
        (["--clip", "--out", "x.png"], "--out must end in .html"),
        (["--clip", "--pairwise", "concatenation", "--scale", "3"], "no θᵢᵀφⱼ term"),
        (["--sample", "--size", "200"], "above the limit of 64 MiB"),
        (["--clip", "--sub-sample", "40"], "larger than the grid"),
    ],
)
def test_explore_usage_errors(capsys, tmp_path, args, match):
    code, out, err = run_cli(capsys, "explore", *args)
    assert code == 2
    assert match in err and len(err.strip().splitlines()) == 1
    assert "wrote" not in out


def test_explore_bad_npy(capsys, tmp_path):
    np.save(tmp_path / "v.npy", np.zeros(5))
    code, _, err = run_cli(capsys, "explore", str(tmp_path / "v.npy"))
    assert code == 2 and "expected an image (H, W, 3) or a clip" in err
