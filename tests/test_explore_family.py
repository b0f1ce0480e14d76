"""The explorer of the Non-local family (``nlref explore --family gcnet|dnl``): the hand-set
blocks of :mod:`nlref.demo.family`, the page's layers and panels, the command, and the
page in headless Chromium (the fixtures of ``tests/test_explore_browser.py``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import nlref
from nlref import analysis, explore
from nlref.demo import family as demo_family
from nlref.demo import photo

from .conftest import require, run_cli
from .explore_pages import bound, decoded_rows, page_data, square_photo
from .test_explore_browser import Watch, chromium  # noqa: F401  (the browser fixture)

SIZE = 24


def _features(size: int = SIZE) -> Any:
    small, _ = photo.downsample(square_photo(), size)
    return photo.pixel_features(small)


def test_hand_set_blocks_split_the_embedded_gaussian() -> None:
    """The embedded Gaussian's row is the renormalised product of DNL's whitened pairwise
    row and its unary map, which is GCNet's one map."""
    require("matplotlib")
    caches = demo_family.family_caches(_features().x, scale=6.0)
    eg = nlref.to_numpy(caches["embedded_gaussian"].attention)
    pairwise, unary = caches["dnl"].attention, caches["dnl"].unary_attention
    product = pairwise * unary
    np.testing.assert_allclose(product / product.sum(-1, keepdims=True), eg, rtol=0, atol=1e-13)
    np.testing.assert_array_equal(caches["gcnet"].attention, unary)
    # the whitening takes the shared factor out: the pairwise rows differ from their mean
    # by less than the embedded Gaussian's (on this photo), and the unary map is one row
    eg_dep = float(analysis.query_dependence(eg)[0])
    pair_dep = float(analysis.query_dependence(pairwise)[0])
    assert 0.3 < pair_dep < eg_dep
    assert float(analysis.query_dependence(unary)[0]) == 0.0


@pytest.mark.parametrize("family", ["gcnet", "dnl"])
def test_page_layers_maps_and_panels(family: str) -> None:
    require("matplotlib")
    page = explore.from_family(square_photo(), family, size=SIZE)
    data = page_data(page.html)
    names = [v["name"] for v in data["variants"]]
    caches = demo_family.family_caches(_features().x, scale=6.0)
    if family == "gcnet":
        assert names == ["embedded_gaussian", "gcnet"]
        only, map_name, want = (
            data["variants"][1],
            "α (every query's map)",
            caches["gcnet"].attention,
        )
    else:
        assert names == ["embedded_gaussian", "dnl pairwise", "dnl unary"]
        only, map_name = data["variants"][2], "unary u"
        want = caches["dnl"].unary_attention
        rows = decoded_rows(data, 1)
        true = caches["dnl"].attention[0]
        assert np.all(np.abs(rows - true) <= np.stack([bound(r) for r in true]))
    assert data["sideBySide"] is True and only["rows"] is None
    assert [m["name"] for m in only["maps"]] == [map_name]
    import base64

    stored = np.frombuffer(base64.b64decode(only["maps"][0]["values"]), "<f8")
    np.testing.assert_array_equal(stored, want[0, 0])  # maps are stored exactly
    assert math.isnan(page.query_dependence[names[-1]])
    assert page.query_dependence["embedded_gaussian"] > 0.3
    with pytest.raises(ValueError, match="family must be one of"):
        explore.from_family(square_photo(), "se")


def test_the_command(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    require("matplotlib")
    out_path = tmp_path / "dnl.html"
    code, out, _ = run_cli(
        capsys, "explore", "--sample", "--family", "dnl", "--size", "16", "--out", str(out_path)
    )
    assert code == 0, out
    assert "dnl pairwise 0." in out and "dnl unary 0 (one map for every query)" in out
    assert [v["name"] for v in page_data(out_path.read_text())["variants"]][-1] == "dnl unary"
    code, _, err = run_cli(
        capsys, "explore", "--sample", "--family", "gcnet", "--pairwise", "dot_product"
    )
    assert code == 2 and "leave out --pairwise" in err
    code, _, err = run_cli(capsys, "explore", "--clip", "--family", "dnl")
    assert code == 2 and "--family shows an image, not a clip" in err


def test_the_page_in_a_browser(chromium: Any, tmp_path: Path) -> None:  # noqa: F811
    """Three panels; a new query redraws the two per-query panels, not the unary map;
    the page's numbers are nlref's."""
    require("matplotlib")
    path = explore.from_family(square_photo(), "dnl", size=SIZE).save(tmp_path / "dnl.html")
    watch = Watch(chromium, path.resolve().as_uri())
    watch.open()
    page = watch.page
    panels = ["embedded_gaussian", "dnl pairwise", "dnl unary"]
    assert page.evaluate("window.nlref.panels") == panels
    h, w = page.evaluate("window.nlref.grid")["queries"]  # 23×23: 512 px in cells of 22
    canvases = page.locator("#frames canvas")
    assert canvases.count() == 3

    def shots() -> list[bytes]:
        return [canvases.nth(k).screenshot() for k in range(3)]

    def point(cell: tuple[int, int]) -> None:
        box = canvases.nth(1).bounding_box()  # any panel chooses the query
        page.mouse.move(
            box["x"] + (cell[1] + 0.5) / w * box["width"],
            box["y"] + (cell[0] + 0.5) / h * box["height"],
        )

    point((5, 12))
    before = shots()
    point((18, 6))
    after = shots()
    assert page.evaluate("window.nlref.selected")["query"] == [18, 6]
    assert before[0] != after[0] and before[1] != after[1]
    import io

    from PIL import Image

    def pixels(png: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)

    # the unary panel changes only where the query's marker moved
    moved = np.any(pixels(before[2]) != pixels(after[2]), axis=-1).mean()
    assert moved < 0.05, moved
    caches = demo_family.family_caches(_features().x, scale=6.0)
    shown = np.array(page.evaluate("window.nlref.map('dnl unary', 'unary u')"))
    np.testing.assert_array_equal(shown, caches["dnl"].unary_attention[0, 0])
    row = np.array(page.evaluate("window.nlref.row('dnl pairwise', 18, 6)"))
    true = caches["dnl"].attention[0, 18 * w + 6]
    assert np.all(np.abs(row - true) <= bound(true))
    assert watch.errors == [] and watch.blocked == []
    page.close()
