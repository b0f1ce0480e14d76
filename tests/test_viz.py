"""nlref.viz and nlref.demo.photo: indexing, plots from every backend, images, features.

Plots are checked for what they contain (panels, images, the query marker), not by
comparing pixels. The attention maps are checked for meaning: on the synthetic clip, a
query on the moving ball puts most of its attention on the ball in every frame.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import nlref
from nlref import viz
from nlref.demo import figures, photo

from .conftest import require


@pytest.fixture(autouse=True)
def _matplotlib():
    """Every test here draws or reads images: matplotlib (CI requires it, NLREF_REQUIRE)."""
    require("matplotlib")


def attention(n, n_keys, b=1, seed=0):
    a = np.random.default_rng(seed).random((b, n, n_keys))
    return a / a.sum(axis=-1, keepdims=True)


# ----------------------------------------------------------------------- indexing


def test_flat_index_roundtrip():
    spatial = (3, 4, 5)
    for i in (0, 7, 59):
        assert viz.flat_index(viz.unravel(i, spatial), spatial) == i
    assert viz.flat_index((1, 2), (3, 4)) == 6
    assert viz.flat_index(5, (3, 4)) == 5


@pytest.mark.parametrize(
    ("query", "spatial", "match"),
    [
        ((3, 0), (3, 4), "outside the grid"),
        ((1,), (3, 4), "1 coordinates"),
        (12, (3, 4), "outside"),
    ],
)
def test_flat_index_errors(query, spatial, match):
    with pytest.raises(ValueError, match=match):
        viz.flat_index(query, spatial)


def test_attention_row_on_every_backend(xp):
    host = attention(12, 12, b=2)
    row = viz.attention_row(xp.asarray(host), (1, 2), (3, 4), batch=1)
    assert isinstance(row, np.ndarray) and row.shape == (3, 4)
    np.testing.assert_array_equal(row.reshape(-1), host[1, 6])


def test_attention_row_infers_pooled_key_grids():
    assert viz.attention_row(attention(24, 6), 0, (4, 6)).shape == (2, 3)  # 2x2 pooling
    assert viz.attention_row(attention(4 * 36, 4 * 9), 0, (4, 6, 6)).shape == (4, 3, 3)
    assert viz.attention_row(attention(24, 6), 0, (4, 6), key_spatial=(3, 2)).shape == (3, 2)
    with pytest.raises(ValueError, match="key_spatial"):
        viz.attention_row(attention(24, 7), 0, (4, 6))
    with pytest.raises(ValueError, match="N=24 queries"):
        viz.attention_row(attention(24, 6), 0, (5, 5))


# ----------------------------------------------------------------------- plots


def _images(fig):
    return [im for ax in fig.axes for im in ax.get_images()]


def test_plot_attention_2d_from_every_backend(xp):
    img = np.random.default_rng(0).random((40, 60, 3))
    att = xp.asarray(attention(8 * 12, 8 * 12))
    fig = viz.plot_attention_2d(img, att, [(1, 2), (7, 11)], spatial=(8, 12))
    from matplotlib.figure import Figure

    assert isinstance(fig, Figure)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(panels) == 3 and len(bars) == 2  # the input, two queries, a bar each
    # queries in image pixels (the centre of the cell), with their grid cell
    assert [ax.get_title() for ax in panels[1:]] == [
        "query pixel (7, 12), cell (1, 2)",
        "query pixel (37, 57), cell (7, 11)",
    ]
    assert "each panel" in bars[-1].get_ylabel()
    # each query panel: the dimmed image and the overlay, both stretched over the image
    assert all(im.get_extent() == [0.0, 60.0, 40.0, 0.0] for im in _images(fig)[1:])
    # the query marker sits at the centre of its grid cell, in image pixels
    x, y = fig.axes[1].lines[0].get_data()
    assert (x[0], y[0]) == pytest.approx(((2 + 0.5) * 60 / 12, (1 + 0.5) * 40 / 8))


def test_plot_attention_2d_without_image_and_errors():
    att = attention(12, 12)
    fig = viz.plot_attention_2d(None, att, [3], spatial=(3, 4))
    assert len(fig.axes) == 2  # the map and its colour bar
    assert fig.axes[0].get_title() == "query (0, 3)"  # no image: pixels are cells
    with pytest.raises(ValueError, match="ambiguous"):
        viz.plot_attention_2d(None, att, (1, 2), spatial=(3, 4))
    with pytest.raises(ValueError, match="2D query grid"):
        viz.plot_attention_2d(None, attention(24, 24), [0], spatial=(2, 3, 4))
    with pytest.raises(ValueError, match="titles"):
        viz.plot_attention_2d(None, att, [0, 1], spatial=(3, 4), titles=["one"])


def test_plot_attention_clip(xp):
    clip = np.random.default_rng(1).random((4, 8, 8, 3))
    att = xp.asarray(attention(4 * 64, 4 * 16))  # keys pooled (1, 2, 2)
    fig = viz.plot_attention_clip(clip, att, (2, 3, 5))
    titles = [ax.get_title() for ax in fig.axes]
    assert titles.count("query in frame 2 at (3, 5)") == 1
    assert "keys pooled 1×2×2: 4×4×4 key grid" in fig.get_suptitle()
    assert sum(t.startswith("frame") for t in titles) == 4
    assert any(ax.get_label() == "<colorbar>" for ax in fig.axes)


def test_plot_pairwise_comparison(xp):
    img = np.random.default_rng(2).random((6, 8, 3))
    atts = {
        name: xp.asarray(attention(48, 12, seed=k)) for k, name in enumerate(nlref.pairwise.names())
    }
    atts["dot_product"] = xp.asarray(np.random.default_rng(9).standard_normal((1, 48, 12)))
    fig = viz.plot_pairwise_comparison(img, atts, (2, 3), spatial=(6, 8))
    titles = [ax.get_title() for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert [t.split("\n")[0] for t in titles] == list(nlref.pairwise.names())
    assert "softmax over j" in titles[0] and "f / N′" in titles[2]


def test_plot_attention_matrix_refuses_huge_inputs():
    fig = viz.plot_attention_matrix(attention(20, 5))
    assert _images(fig)[0].get_array().shape == (20, 5)
    fig.canvas.draw()
    ticks = [t for t in fig.axes[0].get_xticks() if -0.5 <= t <= 4.5]
    assert ticks and all(float(t).is_integer() for t in ticks)  # keys are integers
    with pytest.raises(ValueError, match="max_entries"):
        viz.plot_attention_matrix(attention(200, 200))


def test_save_png(tmp_path):
    from PIL import Image

    fig = viz.plot_attention_matrix(attention(10, 10))
    plain = viz.save_png(fig, tmp_path / "a" / "m.png", dpi=50)
    small = viz.save_png(fig, tmp_path / "m_palette.png", dpi=50, palette=True)
    assert plain.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(small) as im:
        assert im.mode == "P"
    with pytest.raises(ValueError, match=r"\.png"):
        viz.save_png(fig, tmp_path / "m.jpg")
    with pytest.raises(ValueError, match="dpi must be a positive number"):
        viz.save_png(fig, tmp_path / "m.png", dpi=0)


def test_nlref_imports_without_matplotlib():
    """``import nlref`` (and nlref.viz itself) must work without matplotlib; plotting then
    fails with an ImportError that says what to install."""
    code = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "matplotlib" or name.startswith("matplotlib."):
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        import numpy as np
        import nlref
        from nlref import viz
        from nlref.demo import toy, photo
        assert "matplotlib" not in sys.modules
        try:
            viz.plot_attention_matrix(np.ones((1, 2, 2)))
        except ImportError as err:
            assert "nlref[viz]" in str(err), err
        else:
            raise SystemExit("plotting without matplotlib did not raise")
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def _block(sub_sample=None, chunk_size=None, shape=(1, 3, 6, 8)):
    cfg = nlref.NonLocalConfig(
        in_channels=shape[1], pairwise="embedded_gaussian", sub_sample=sub_sample
    )
    params = nlref.init_params(cfg, rng=0, scheme="random")
    x = np.random.default_rng(1).standard_normal(shape)
    return nlref.forward(x, params, cfg, training=False, chunk_size=chunk_size)[1]


def test_plots_read_rows_from_a_tiled_cache():
    """A cache whose attention the engine never held (tiles): rows are recomputed."""
    tiled = _block(sub_sample=(2, 2), chunk_size=5)
    whole = _block(sub_sample=(2, 2))
    with pytest.raises(nlref.AttentionNotStoredError):
        tiled.attention  # noqa: B018
    row = viz.attention_row(tiled, (4, 5))  # the cache knows its grids
    assert row.shape == (3, 4)
    np.testing.assert_allclose(row, viz.attention_row(whole.attention, (4, 5), (6, 8)))
    img = np.random.default_rng(2).random((12, 16, 3))
    fig = viz.plot_attention_2d(img, tiled, [(0, 0), (5, 7)])
    assert "keys pooled 2×2: 3×4 key grid" in fig.get_suptitle()
    fig = viz.plot_pairwise_comparison(img, {"embedded_gaussian": tiled}, (5, 7))
    assert "query pixel (11, 15), cell (5, 7)" in fig.get_suptitle()
    assert viz.plot_attention_matrix(tiled) is not None


def test_pooled_keys_cover_their_windows():
    """Max-pooling 7 rows by 2 keeps 3 windows (6 rows): the map stops short of the edge."""
    att = attention(7 * 8, 3 * 4)
    img = np.zeros((70, 80, 3))
    fig = viz.plot_attention_2d(img, att, [(0, 0)], spatial=(7, 8), show_image=False)
    overlay = _images(fig)[1]
    assert overlay.get_extent() == [0.0, 80.0, 60.0, 0.0]
    assert viz.key_grid((7, 8), 12) == ((3, 4), (2, 2))
    assert viz.key_grid((4, 6, 6), 4 * 9) == ((4, 3, 3), (1, 2, 2))
    with pytest.raises(ValueError, match="does not give the key grid"):
        viz.key_grid((7, 8), 12, kernel=(3, 3))


def test_query_labels():
    assert viz.query_label((2, 3), (10, 20), (100, 200)) == "query pixel (25, 35), cell (2, 3)"
    assert viz.query_label(5, (4, 4)) == "query (1, 1)"
    assert viz.query_label((2, 3), (10, 20), (100, 200), pixel=(21, 30)) == (
        "query pixel (21, 30), cell (2, 3)"
    )
    assert viz.query_label((1, 2, 3), (4, 10, 20), (20, 40)) == (
        "query in frame 1 at pixel (5, 7), cell (1, 2, 3)"
    )


def test_colour_scales():
    """Weak attention stays visible on a log scale, and the colour bar says the scale."""
    sharp = np.full((1, 2, 4), 1e-3)
    sharp[0, :, 0] = 1.0
    spread = np.full((1, 2, 4), 0.25)
    att = np.concatenate([sharp, spread], axis=1)  # 4 queries on a 2×2 grid, 4 keys
    img = np.full((2, 2, 3), 0.5)

    def weak_alpha(colour_scale):
        fig = viz.plot_attention_2d(img, att, [0], spatial=(2, 2), colour_scale=colour_scale)
        bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
        rgba = _images(fig)[2].get_array()  # input, dimmed image, overlay
        return float(rgba[1, 1, 3]), bars[-1].get_ylabel()  # a key with weight 1e-3

    linear, label = weak_alpha("panel")
    log, log_label = weak_alpha("log")
    assert linear < 0.05 < 0.4 < log  # invisible on a linear scale, seen on the log one
    assert "each panel" in label and "log scale, 4 decades" in log_label
    fig = viz.plot_attention_2d(None, att, [0, 2], spatial=(2, 2), colour_scale="shared")
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1 and "one scale" in bars[0].get_ylabel()
    with pytest.raises(ValueError, match="colour_scale must be one of"):
        viz.plot_attention_2d(None, att, [0], spatial=(2, 2), colour_scale="loud")
    with pytest.raises(ValueError, match="different units"):
        viz.plot_pairwise_comparison(None, {"a": att}, 0, spatial=(2, 2), colour_scale="shared")


# ----------------------------------------------------------------------- images


def test_load_image_png_jpeg_grey_and_alpha(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    rgb = (rng.random((9, 7, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    yy, xx = np.mgrid[0:9, 0:7]
    smooth = np.stack([yy * 20, xx * 30, 200 - yy * 10], axis=-1).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "c.jpg", quality=95)  # JPEG is lossy: smooth
    Image.fromarray(rgb[:, :, 0]).save(tmp_path / "g.png")
    rgba = np.dstack([rgb, np.full((9, 7), 0, np.uint8)])  # fully transparent: white
    Image.fromarray(rgba).save(tmp_path / "a.png")

    png = photo.load_image(tmp_path / "c.png")
    assert png.shape == (9, 7, 3) and png.dtype == np.float64
    np.testing.assert_allclose(png, rgb / 255.0, atol=1e-7)
    jpg = photo.load_image(tmp_path / "c.jpg")
    assert jpg.shape == (9, 7, 3) and np.abs(jpg - smooth / 255.0).max() < 0.1
    grey = photo.load_image(tmp_path / "g.png")
    np.testing.assert_allclose(grey[:, :, 1], rgb[:, :, 0] / 255.0, atol=1e-7)
    np.testing.assert_allclose(photo.load_image(tmp_path / "a.png"), 1.0)


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no image file"):
        photo.load_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read"):
        photo.load_image(tmp_path / "bad.png")


def test_sample_photo_ships_with_matplotlib():
    img = photo.load_image(photo.sample_photo_path())
    assert img.shape == (600, 512, 3)


def test_downsample_averages_blocks():
    img = np.arange(7 * 5 * 3, dtype=float).reshape(7, 5, 3)
    small, f = photo.downsample(img, 3)
    assert f == 3 and small.shape == (2, 1, 3)
    np.testing.assert_allclose(small[0, 0], img[:3, :3].mean(axis=(0, 1)))
    same, f1 = photo.downsample(img, 10)
    assert f1 == 1 and same.shape == img.shape


def test_pixel_features_lie_on_a_sphere():
    img = np.random.default_rng(4).random((6, 9, 3))
    feats = photo.pixel_features(img, position_weight=0.5)
    assert feats.x.shape == (1, 6, 6, 9)
    assert feats.channels == ("r", "g", "b", "pos_y", "pos_x", "lift")
    norms = np.linalg.norm(feats.x.reshape(6, -1), axis=0)
    np.testing.assert_allclose(norms, norms[0], rtol=1e-12)
    clip = photo.pixel_features(np.random.default_rng(5).random((3, 4, 4, 3)))
    assert clip.x.shape == (1, 7, 3, 4, 4)


def test_gaussian_on_sphere_features_is_a_distance_kernel():
    """softmax_j(α xᵢᵀxⱼ) = softmax_j(−α‖xᵢ − xⱼ‖²/2) once every ‖xⱼ‖ is equal."""
    feats = photo.pixel_features(np.random.default_rng(6).random((5, 6, 3)))
    att = photo.attention_by_variant(feats.x, variants=["gaussian"], scale=3.0)["gaussian"][0]
    x = feats.x.reshape(feats.x.shape[1], -1).T
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    logits = -1.5 * d2
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(att, expected, rtol=1e-10, atol=1e-14)


def test_attention_by_variant_on_every_backend(xp):
    feats = photo.pixel_features(np.random.default_rng(7).random((4, 6, 3)))
    atts = photo.attention_by_variant(xp.asarray(feats.x), scale=2.0, sub_sample=(2, 2))
    assert list(atts) == list(nlref.pairwise.names())
    for name, att in atts.items():
        assert tuple(att.shape) == (1, 24, 6)
        host = nlref.to_numpy(att)
        if nlref.pairwise.get(name).softmax:
            np.testing.assert_allclose(host.sum(-1), 1.0, rtol=1e-12)
    # identity embeddings: the embedded Gaussian is the Gaussian
    np.testing.assert_allclose(
        nlref.to_numpy(atts["embedded_gaussian"]), nlref.to_numpy(atts["gaussian"]), rtol=1e-12
    )
    # the concatenation is a query term plus a key term: every query ranks keys alike
    concat = nlref.to_numpy(atts["concatenation"])[0]
    live = concat[concat.sum(1) > 0]
    order = np.argsort(live, axis=1, kind="stable")
    assert all(
        np.array_equal(np.argsort(r, kind="stable")[r > 0], o[r[o] > 0])
        for r, o in zip(live, order, strict=True)
    )


def test_hand_set_params_needs_square_embeddings():
    cfg = nlref.NonLocalConfig(in_channels=6, inter_channels=3, norm=None, biases=())
    with pytest.raises(ValueError, match="inter_channels == in_channels"):
        photo.hand_set_params(cfg)


def test_clip_query_on_the_ball_attends_to_the_ball_in_every_frame():
    clip, centres = photo.synthetic_clip(frames=5, size=16)
    feats = photo.pixel_features(clip, position_weight=0.25)
    att = photo.attention_by_variant(feats.x, variants=["gaussian"], scale=6.0)["gaussian"]
    row = viz.attention_row(att, (2, *centres[2]), feats.spatial)
    ball = np.all(np.abs(clip - np.array([0.9, 0.1, 0.1])) < 1e-9, axis=-1)
    assert ball.mean() < 0.1  # the ball is a small part of the clip...
    assert row[ball].sum() > 0.5  # ...but gets most of the attention
    for t in range(5):  # and every frame, even the farthest in time and space
        assert row[t][ball[t]].sum() > 2 * ball[t].mean() * row[t].sum()


def test_photo_query_on_the_cap_attends_to_the_uniform():
    """The non-local claim on the real photo: the cap and the uniform are far apart but of
    the same navy; the cap's query gives the uniform more attention than the face."""
    setup = figures.photo_setup()
    att = photo.attention_by_variant(setup.features.x, variants=["gaussian"], scale=6.0)
    row = viz.attention_row(att["gaussian"], setup.queries[0], setup.features.spatial)
    h, w = row.shape
    uniform = row[int(0.8 * h) :, int(0.25 * w) : int(0.75 * w)].mean()
    face = row[int(0.35 * h) : int(0.55 * h), int(0.4 * w) : int(0.6 * w)].mean()
    assert uniform > 5 * face
