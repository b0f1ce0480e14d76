"""The attention explorer in a real browser: headless Chromium, driven by Playwright.

Chromium is Debian's ``chromium`` package (``/usr/bin/chromium``, installed by ``.ci/run``);
nothing is downloaded. Without Chromium or Playwright these tests are skipped, unless
``NLREF_REQUIRE`` names ``chromium``: then they fail.

They check what a user sees and what scripts read: the page of the size case (a 64×64
query grid over a pooled 32×32 key grid, every pairwise function) loads with no console
error and no network request; moving the pointer to two queries draws two different maps;
``window.nlref.row`` equals nlref's own attention rows to the stored precision; a clip works
frame by frame; and the page runs inside Jupyter's iframe. The load time and the page size
are measured and printed (``-s``, or the ``record_property`` entries of a JUnit report);
the size is asserted, the time is not (speed is shown by measurement, not by timed tests).
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import nlref
from nlref import explore
from nlref.explore import browser

from .conftest import require, unavailable
from .explore_pages import (
    BIG,
    BIG_LIMIT_BYTES,
    bound,
    caches_like_from_image,
    square_photo,
)

REQUIREMENT = "chromium"


def need_browser() -> None:
    """Skip without Chromium or Playwright; fail instead when NLREF_REQUIRE says chromium."""
    problems = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as err:
        problems.append(f"Playwright is not installed ({err}); pip install -e '.[test]'")
    if browser.chromium_path() is None:
        problems.append("no Chromium at /usr/bin/chromium (Debian: apt-get install chromium)")
    if problems:
        unavailable(REQUIREMENT, "; ".join(problems))


@pytest.fixture(scope="module")
def chromium() -> Any:
    need_browser()
    require("matplotlib")
    with browser.headless_chromium(width=1200, height=820) as context:
        yield context


@pytest.fixture(scope="module")
def big_page(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The size case, built once: its path, size, build time and the image."""
    need_browser()
    require("matplotlib")
    image = square_photo()
    start = time.perf_counter()
    page = explore.from_image(image, **BIG)
    seconds = time.perf_counter() - start
    path = page.save(tmp_path_factory.mktemp("explorer") / "big.html")
    return {"path": path, "nbytes": page.nbytes, "build_s": seconds, "image": image}


class Watch:
    """Console errors, page errors and every request a page makes (all but the page itself
    are aborted)."""

    def __init__(self, context: Any, url: str) -> None:
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.blocked: list[str] = []
        self.page = context.new_page()
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda err: self.errors.append(f"page error: {err}"))
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.url = url
        self.page.route("**/*", self._route)

    def _console(self, message: Any) -> None:
        if message.type in ("error", "warning"):
            self.errors.append(f"console {message.type}: {message.text}")

    def _route(self, route: Any) -> None:
        if route.request.url == self.url:
            route.continue_()
        else:
            self.blocked.append(route.request.url)
            route.abort()

    def open(self) -> float:
        start = time.perf_counter()
        self.page.goto(self.url)
        self.page.evaluate("window.nlref.ready")
        return time.perf_counter() - start


def _open(chromium: Any, path: Path) -> Watch:
    watch = Watch(chromium, path.resolve().as_uri())
    watch.open()
    return watch


def test_loads_with_no_error_and_no_network(chromium, big_page, record_property):
    watch = Watch(chromium, big_page["path"].resolve().as_uri())
    seconds = watch.open()
    page = watch.page
    load_ms = page.evaluate("window.nlref.loadMs")
    megabytes = big_page["nbytes"] / 1e6
    record_property("explorer_bytes", big_page["nbytes"])
    record_property("explorer_load_s", round(seconds, 3))
    print(
        f"\nexplorer 64x64 queries / 32x32 keys, 4 pairwise functions: {megabytes:.2f} MB, "
        f"built in {big_page['build_s']:.1f} s, loaded in {seconds:.2f} s "
        f"(page's own clock: {load_ms:.0f} ms from navigation to the first map)"
    )
    assert watch.errors == []
    assert watch.blocked == [] and watch.requests == [watch.url]  # nothing but the file
    assert big_page["nbytes"] < BIG_LIMIT_BYTES
    grid = page.evaluate("window.nlref.grid")
    assert grid["queries"] == [64, 64] and grid["keys"] == [32, 32] and grid["kernel"] == [2, 2]
    assert page.evaluate("window.nlref.variants") == list(nlref.pairwise.names())
    assert page.evaluate("document.body.dataset.ready") == "true"
    page.close()


def _canvas_png(page: Any) -> np.ndarray:
    from PIL import Image

    shot = page.locator("#frames canvas").first.screenshot()
    return np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"), dtype=np.int16)


def _point_at(page: Any, cell: tuple[int, int], grid: tuple[int, int]) -> None:
    """Move the mouse to the centre of a query cell of the (single) image."""
    box = page.locator("#frames canvas").first.bounding_box()
    x = box["x"] + (cell[1] + 0.5) / grid[1] * box["width"]
    y = box["y"] + (cell[0] + 0.5) / grid[0] * box["height"]
    page.mouse.move(x, y)


def test_the_pointer_chooses_the_query_and_its_map(chromium, big_page):
    watch = _open(chromium, big_page["path"])
    page = watch.page
    shots, panels = [], []
    for cell in ((10, 20), (50, 40)):  # the cap, then the uniform
        _point_at(page, cell, (64, 64))
        assert page.evaluate("window.nlref.selected")["query"] == list(cell)
        assert page.evaluate("document.body.dataset.query") == f"{cell[0]},{cell[1]}"
        shots.append(_canvas_png(page))
        panels.append(page.locator("#panel").inner_text())
    changed = np.any(shots[0] != shots[1], axis=-1).mean()
    assert changed > 0.05, changed  # two different maps, not just the marker
    assert "cell (10, 20)" in panels[0] and "cell (50, 40)" in panels[1]
    assert "pixel (" in panels[0] and "row entropy" in panels[0]
    # click pins the query; the arrow keys step it; a button switches the variant
    page.mouse.down()
    page.mouse.up()
    _point_at(page, (5, 5), (64, 64))
    assert page.evaluate("window.nlref.selected")["query"] == [50, 40]
    page.keyboard.press("ArrowRight")
    assert page.evaluate("window.nlref.selected")["query"] == [50, 41]
    before = _canvas_png(page)
    page.locator("#variants button", has_text="dot_product").click()
    assert page.evaluate("window.nlref.selected")["variant"] == "dot_product"
    assert np.any(_canvas_png(page) != before)
    assert watch.errors == [] and watch.blocked == []
    page.close()


def test_rows_equal_nlref_rows_to_the_stored_precision(chromium, big_page):
    watch = _open(chromium, big_page["path"])
    caches = caches_like_from_image(big_page["image"], **BIG)
    for name, cache in caches.items():
        for y, x in ((0, 0), (13, 47), (31, 32), (63, 63)):
            i = y * 64 + x
            true = nlref.to_numpy(cache.attention_rows(i, i + 1))[0, 0]
            shown = np.array(watch.page.evaluate(f"window.nlref.row('{name}', {y}, {x})"))
            assert shown.shape == (32 * 32,)
            err = np.abs(shown - true)
            assert np.all(err <= bound(true)), (name, y, x, float(err.max()))
    assert watch.errors == []
    watch.page.close()


def test_a_clip_frame_by_frame(chromium, tmp_path):
    page_obj = explore.from_clip(pairwise="gaussian", sub_sample=2)
    watch = _open(chromium, page_obj.save(tmp_path / "clip.html"))
    page = watch.page
    assert page.evaluate("window.nlref.grid")["queries"] == [6, 24, 24]
    assert page.locator("#frames canvas").count() == 6
    box = page.locator("#frames canvas").nth(4).bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.25)
    assert page.evaluate("window.nlref.selected")["query"] == [4, 6, 12]
    from nlref.demo import photo

    clip, _ = photo.synthetic_clip()
    feats = photo.pixel_features(clip)
    cache = photo.block_caches(feats.x, variants=["gaussian"], scale=6.0, sub_sample=(1, 2, 2))
    i = (4 * 24 + 6) * 24 + 12
    true = nlref.to_numpy(cache["gaussian"].attention_rows(i, i + 1))[0, 0]
    shown = np.array(page.evaluate("window.nlref.row('gaussian', 4, 6, 12)"))
    assert np.all(np.abs(shown - true) <= bound(true))
    assert watch.errors == [] and watch.blocked == []
    page.close()


def test_runs_inside_the_jupyter_iframe(chromium):
    """Jupyter shows _repr_html_: the page in a sandboxed iframe, scripts running."""
    yy, xx = np.mgrid[0:20, 0:30]
    image = np.stack([xx / 30, yy / 20, 0.5 + 0 * xx], axis=-1)
    shown = explore.from_image(image, size=10)._repr_html_()
    page = chromium.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.set_content(f"<!DOCTYPE html><html><body>{shown}</body></html>")
    frame = page.frame_locator("iframe").locator("body")
    frame.locator("#frames canvas").wait_for()
    inner = next(f for f in page.frames if f != page.main_frame)
    inner.wait_for_function("window.nlref && document.body.dataset.ready === 'true'")
    assert inner.evaluate("window.nlref.grid")["queries"] == [6, 10]
    assert errors == []
    page.close()
