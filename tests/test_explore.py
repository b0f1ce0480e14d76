"""nlref.explore without a browser: what the page holds, from every kind of input.

The page's rows are decoded here as its script decodes them and compared with nlref's own
attention to the stored precision; tests/test_explore_browser.py checks the same in
Chromium, with the pointer.
"""

from __future__ import annotations

import base64
import json
import math

import numpy as np
import pytest

import nlref
from nlref import explore, viz
from nlref.demo import photo

from .conftest import require
from .explore_pages import bound, caches_like_from_image, decoded_rows, page_data


@pytest.fixture(autouse=True)
def _matplotlib():
    """Images are read and encoded with matplotlib and Pillow (the viz extra)."""
    require("matplotlib")


def small_image(h=30, w=40, seed=0):
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx / w, yy / h, 1 - xx / w], axis=-1)
    img[2:8, 30:38] = (0.9, 0.1, 0.1)  # two red patches, far apart
    img[20:27, 3:10] = (0.9, 0.1, 0.1)
    return np.clip(img + 0.01 * np.random.default_rng(seed).random(img.shape), 0.0, 1.0)


def test_page_rows_match_nlref_rows_to_the_stored_precision():
    img = small_image()
    page = explore.from_image(img, pairwise="all", size=20, sub_sample=2)
    data = page_data(page.html)
    caches = caches_like_from_image(img, size=20, sub_sample=2, pairwise="all")
    assert [v["name"] for v in data["variants"]] == list(caches)
    assert data["queries"] == [15, 20] and data["keys"] == [7, 10] and data["kernel"] == [2, 2]
    assert data["pixels"] == [30, 40] and data["pooled"] is True
    for k, (name, cache) in enumerate(caches.items()):
        decoded = decoded_rows(data, k)
        true = nlref.to_numpy(cache.attention)[0]
        err = np.abs(decoded - true)
        limit = np.stack([bound(r) for r in true])
        assert np.all(err <= limit), (name, float((err - limit).max()))
        assert err.max() > 0  # it is a code, not the floats themselves
    # the Gaussian and the embedded Gaussian with identity embeddings: stored once
    assert data["variants"][1]["rows"] == {"sameAs": 0}
    assert data["variants"][1]["entropy"] == {"sameAs": 0}
    assert page.query_dependence["gaussian"] == pytest.approx(
        page.query_dependence["embedded_gaussian"]
    )


def test_side_panel_numbers_are_nlref_analysis():
    img = small_image(seed=1)
    page = explore.from_image(img, pairwise="gaussian", size=16)
    data = page_data(page.html)
    layer = data["variants"][0]
    cache = caches_like_from_image(img, size=16, sub_sample=1, pairwise="gaussian")["gaussian"]
    summary = nlref.analysis.summarise(cache.attention)
    entropy = np.frombuffer(base64.b64decode(layer["entropy"]), "<f4")
    np.testing.assert_allclose(entropy, summary.entropy[0], rtol=1e-6)
    distance = np.frombuffer(base64.b64decode(layer["distance"]), "<f4")
    np.testing.assert_allclose(distance, summary.distance[0], rtol=1e-5, atol=1e-7)
    top = np.frombuffer(base64.b64decode(layer["top"]), "<u2").reshape(-1, data["topK"])
    expected, _ = nlref.analysis.top_keys(cache.attention[0], data["topK"])
    np.testing.assert_array_equal(top, expected)
    assert layer["summary"]["queryDependence"] == pytest.approx(float(summary.query_dependence[0]))
    maps = {m["name"]: np.frombuffer(base64.b64decode(m["values"]), "<f8") for m in layer["maps"]}
    np.testing.assert_allclose(maps["received"], cache.attention[0].sum(0))
    np.testing.assert_allclose(maps["mean row"], cache.attention[0].mean(0))


def test_the_page_is_self_contained():
    page = explore.from_image(small_image(), size=12)
    html = page.html
    assert html.startswith("<!DOCTYPE html>")
    assert "default-src 'none'" in html  # the page may not load anything
    for outside in ("http://", "https://", "<link", "fetch(", "XMLHttpRequest", "import("):
        assert outside not in html
    assert html.count("<script") == 2  # the data and the code, both inline
    assert page.nbytes == len(html.encode())


def test_clip_from_the_demo_and_from_frames():
    page = explore.from_clip(sub_sample=2)  # the synthetic clip
    data = page_data(page.html)
    assert data["queries"] == [6, 24, 24] and data["keys"] == [6, 12, 12]
    assert data["kernel"] == [1, 2, 2] and data["axes"] == ["t", "y", "x"]
    assert len(data["frames"]) == 6 and data["pixelated"] is True
    clip, _ = photo.synthetic_clip(frames=3, size=16)
    as_bytes = np.rint(clip * 255).astype(np.uint8)
    frames = explore.from_clip(as_bytes, pairwise="dot_product")
    data = page_data(frames.html)
    assert data["queries"] == [3, 16, 16] and [v["name"] for v in data["variants"]] == [
        "dot_product"
    ]
    # uint8 frames are read as value / 255, as the same frames in floats
    same = explore.from_clip(as_bytes / 255.0, pairwise="dot_product")
    assert frames.query_dependence == pytest.approx(same.query_dependence, rel=1e-12)


def test_integer_images_are_scaled_to_0_1():
    img = np.rint(small_image() * 255).astype(np.uint8)
    as_bytes = explore.from_image(img, size=12)
    as_floats = explore.from_image(img / 255.0, size=12)
    assert as_bytes.query_dependence == pytest.approx(as_floats.query_dependence, rel=1e-12)
    np.testing.assert_array_equal(
        decoded_rows(page_data(as_bytes.html), 0), decoded_rows(page_data(as_floats.html), 0)
    )


def test_from_arrays_caches_and_layers():
    rng = np.random.default_rng(2)
    att = rng.random((2, 12, 12))
    att /= att.sum(-1, keepdims=True)
    page = viz.explore(None, att, spatial=(3, 4), batch=1, top_k=3)
    data = page_data(page.html)
    np.testing.assert_array_less(np.abs(decoded_rows(data, 0) - att[1]), 1 / 255 + 1e-12)
    assert data["variants"][0]["name"] == "attention" and data["topK"] == 3
    assert data["pixels"] == [3, 4]  # no image: one grey pixel a cell
    # a layer with only query-independent maps, next to one with rows
    context = explore.Layer(rows=None, label="one map for all queries", maps={"ctx": att[0, 0]})
    page = explore.explore(np.zeros((6, 8, 3)), {"rows": att, "global": context}, spatial=(3, 4))
    data = page_data(page.html)
    assert data["variants"][1]["rows"] is None
    assert [m["name"] for m in data["variants"][1]["maps"]] == ["ctx"]
    assert math.isnan(page.query_dependence["global"])


def test_from_a_tiled_cache():
    """The engine's tiled attention (never held whole) works: rows come from the cache."""
    cfg = nlref.NonLocalConfig(in_channels=3, pairwise="embedded_gaussian", sub_sample=(2, 2))
    params = nlref.init_params(cfg, rng=0, scheme="random")
    x = np.random.default_rng(3).standard_normal((1, 3, 8, 10))
    _, tiled = nlref.forward(x, params, cfg, training=False, chunk_size=7)
    _, whole = nlref.forward(x, params, cfg, training=False)
    data = page_data(viz.explore(small_image(16, 20), tiled).html)
    assert data["variants"][0]["name"] == "embedded_gaussian"
    assert data["queries"] == [8, 10] and data["keys"] == [4, 5]
    true = nlref.to_numpy(whole.attention)[0]
    assert np.all(np.abs(decoded_rows(data, 0) - true) <= np.stack([bound(r) for r in true]))


def test_errors():
    att = np.full((1, 12, 12), 1 / 12)
    with pytest.raises(ValueError, match="N=12 queries"):
        viz.explore(None, att, spatial=(3, 5))
    with pytest.raises(ValueError, match="give the image"):
        viz.explore(None, att)
    with pytest.raises(ValueError, match="shares its grids"):
        viz.explore(None, {"a": att, "b": np.full((1, 12, 2), 0.5)}, spatial=(3, 4))
    with pytest.raises(ValueError, match="at least one layer with per-query rows"):
        viz.explore(None, {"a": explore.Layer(maps={"m": np.ones(3)})}, spatial=(3, 4))
    with pytest.raises(ValueError, match="top_k"):
        viz.explore(None, att, spatial=(3, 4), top_k=0)
    with pytest.raises(ValueError, match="batch=1 outside"):
        viz.explore(None, att, spatial=(3, 4), batch=1)


def test_jupyter_display_and_save(tmp_path):
    page = explore.from_image(small_image(), size=10)
    shown = page._repr_html_()
    assert shown.startswith("<iframe") and 'sandbox="allow-scripts"' in shown
    assert "srcdoc=" in shown and "<script" not in shown  # the page is escaped inside
    path = page.save(tmp_path / "sub" / "page.html")
    assert path.read_text(encoding="utf-8") == page.html
    assert "query dependence gaussian" in repr(page)


def test_estimate_is_an_upper_bound():
    img = small_image()
    page = explore.from_image(img, pairwise="all", size=30)
    n = 15 * 20
    assert page.nbytes <= explore.estimate_bytes(n, n, 4)


def test_estimate_bounds_a_layer_that_does_not_compress():
    """Random rows barely compress: the layer's data alone (rows, per-query numbers and
    the two maps) stays within the per-layer part of the bound."""
    att = np.random.default_rng(4).random((1, 300, 300))
    att /= att.sum(-1, keepdims=True)
    data = page_data(viz.explore(None, att, spatial=(15, 20)).html)
    layer = json.dumps(data["variants"], separators=(",", ":"), ensure_ascii=False)
    per_layer = explore.estimate_bytes(300, 300, 1) - explore.estimate_bytes(0, 0, 0)
    assert len(layer.encode()) <= per_layer


def test_from_a_pytorch_module_inside_a_model():
    """capture() records the block's input inside a real model; from_torch shows the
    block's own attention (nlref's forward on that input matches the module's output)."""
    torch = require("torch")
    mmcv_cnn = require("mmcv.cnn")
    torch.manual_seed(0)
    block = mmcv_cnn.NonLocal2d(8, sub_sample=True, mode="embedded_gaussian")
    torch.nn.init.normal_(block.conv_out.conv.weight, std=0.1)  # an open block
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), block).double().eval()
    images = torch.rand(2, 3, 12, 16, dtype=torch.float64)
    with explore.capture(block) as inputs:
        with torch.no_grad():
            out = model(images)
    assert len(inputs) == 1 and tuple(inputs[0].shape) == (2, 8, 12, 16)
    page = explore.from_torch(block, inputs[0], images[1].permute(1, 2, 0).numpy(), batch=1)
    data = page_data(page.html)
    assert data["queries"] == [12, 16] and data["keys"] == [6, 8]
    cfg, params = nlref.interop.torch.from_torch(block)
    z, cache = nlref.forward(inputs[0].numpy(), params, cfg, training=False)
    np.testing.assert_allclose(z, out.numpy(), rtol=1e-10, atol=1e-12)
    true = nlref.to_numpy(cache.attention)[1]
    assert np.all(np.abs(decoded_rows(data, 0) - true) <= np.stack([bound(r) for r in true]))
    with explore.capture(block) as later:
        pass
    assert later == [] and not block._forward_pre_hooks  # the hook is gone
