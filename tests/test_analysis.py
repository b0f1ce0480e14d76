"""nlref.analysis: each measure against its direct formula, on every backend, from arrays
and from forward caches (tiled ones included)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import nlref
from nlref import analysis

from .conftest import require


def rows(b=2, n=9, n_keys=6, seed=0):
    a = np.random.default_rng(seed).random((b, n, n_keys)) ** 3  # some rows sharp
    return a / a.sum(-1, keepdims=True)


def entropy_direct(a):
    """Σ_j -p log p / log N′, with p = |a| / Σ|a|, one row at a time."""
    out = np.empty(a.shape[:-1])
    for idx in np.ndindex(*a.shape[:-1]):
        p = np.abs(a[idx]) / np.abs(a[idx]).sum()
        out[idx] = -sum(v * math.log(v) for v in p if v > 0) / math.log(a.shape[-1])
    return out


def js_direct(p, q):
    """Jensen–Shannon distance, base 2, written out."""
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]

    def kl(x, y):
        return sum(a * math.log2(a / b) for a, b in zip(x, y, strict=True) if a > 0)

    return math.sqrt(max(0.0, 0.5 * kl(p, m) + 0.5 * kl(q, m)))


def distance_direct(a):
    p = np.abs(a) / np.abs(a).sum(-1, keepdims=True)
    mean = p.mean(axis=1)
    return np.array([[js_direct(p[b, i], mean[b]) for i in range(a.shape[1])] for b in range(2)])


def test_measures_match_direct_formulas(xp):
    host = rows()
    summary = analysis.summarise(xp.asarray(host), rows_per_block=4)  # 3 blocks of rows
    got = {k: nlref.to_numpy(getattr(summary, k)) for k in ("entropy", "distance", "received")}
    np.testing.assert_allclose(got["entropy"], entropy_direct(host), rtol=1e-12)
    np.testing.assert_allclose(got["distance"], distance_direct(host), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got["received"], host.sum(axis=1), rtol=1e-13)
    np.testing.assert_allclose(nlref.to_numpy(summary.mean_row), host.mean(axis=1), rtol=1e-13)
    np.testing.assert_allclose(
        nlref.to_numpy(summary.query_dependence), distance_direct(host).mean(axis=1), rtol=1e-10
    )
    # the one-measure functions agree with summarise
    np.testing.assert_allclose(
        nlref.to_numpy(analysis.entropy_fraction(xp.asarray(host))), got["entropy"], rtol=1e-14
    )
    np.testing.assert_allclose(
        nlref.to_numpy(analysis.received_attention(xp.asarray(host))), got["received"]
    )
    np.testing.assert_allclose(
        nlref.to_numpy(analysis.query_dependence(xp.asarray(host))),
        nlref.to_numpy(summary.query_dependence),
    )


def test_against_scipy():
    from scipy import stats as scipy_stats  # the test extra installs SciPy
    from scipy.spatial import distance

    host = rows(seed=1)
    s = analysis.summarise(host)
    np.testing.assert_allclose(s.entropy, scipy_stats.entropy(host, axis=-1) / math.log(6))
    mean = host.mean(axis=1)
    expected = [
        [distance.jensenshannon(host[b, i], mean[b], base=2) for i in range(9)] for b in (0, 1)
    ]
    np.testing.assert_allclose(s.distance, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("library", ["torch", "jax"])
def test_torch_and_jax_arrays(library):
    module = require(library)
    host = rows(seed=2)
    arr = module.asarray(host) if library == "torch" else module.numpy.asarray(host)
    s = analysis.summarise(arr)  # JAX without x64 mode: float32 arrays
    assert type(s.entropy).__module__.split(".")[0] in ("torch", "jax", "jaxlib")
    rtol = 1e-12 if nlref.to_numpy(s.entropy).dtype == np.float64 else 1e-5
    np.testing.assert_allclose(nlref.to_numpy(s.entropy), entropy_direct(host), rtol=rtol)
    np.testing.assert_allclose(
        nlref.to_numpy(s.distance), distance_direct(host), rtol=rtol * 1e3, atol=1e-6
    )


def test_extremes_uniform_one_hot_and_query_independent():
    n, n_keys = 5, 8
    uniform = np.full((1, n, n_keys), 1 / n_keys)
    s = analysis.summarise(uniform)
    np.testing.assert_allclose(s.entropy, 1.0)
    np.testing.assert_allclose(s.query_dependence, 0.0, atol=1e-12)
    one_hot = np.zeros((1, n, n_keys))
    one_hot[0, np.arange(n), np.arange(n)] = 1.0  # each query on its own key
    s = analysis.summarise(one_hot)
    np.testing.assert_allclose(s.entropy, 0.0, atol=1e-15)
    # each row vs the mean (1/5 on five keys): JS distance of a point mass to that mean
    expected = js_direct(one_hot[0, 0], one_hot[0].mean(0))
    np.testing.assert_allclose(s.query_dependence, expected, rtol=1e-12)
    same = np.broadcast_to(rows(1, 1, n_keys, seed=3), (1, n, n_keys))  # GCNet's collapse
    assert float(analysis.query_dependence(same)[0]) == pytest.approx(0.0, abs=1e-7)
    assert 0 < float(analysis.entropy_fraction(same)[0, 0]) < 1


def test_signed_and_zero_rows():
    a = np.array([[[1.0, -1.0, 2.0], [0.0, 0.0, 0.0], [0.5, 0.25, 0.25]]])
    s = analysis.summarise(a)
    np.testing.assert_allclose(s.entropy[0, 0], entropy_direct(np.array([1.0, 1.0, 2.0])))
    assert np.isnan(s.entropy[0, 1]) and np.isnan(s.distance[0, 1])
    p = np.array([[0.25, 0.25, 0.5], [0.5, 0.25, 0.25]])  # the rows that are distributions
    np.testing.assert_allclose(s.mean_row[0], p.mean(0))
    np.testing.assert_allclose(
        s.query_dependence[0], np.mean([js_direct(r, p.mean(0)) for r in p]), rtol=1e-12
    )
    np.testing.assert_allclose(s.received[0], a[0].sum(0))  # the raw rows, signs kept
    assert np.isnan(analysis.summarise(np.zeros((1, 2, 3))).query_dependence[0])


def test_one_key_is_uniform():
    np.testing.assert_allclose(analysis.entropy_fraction(np.ones((1, 4, 1))), 1.0)


def test_from_caches_materialised_and_tiled():
    """A tiled cache (the engine never held the attention) gives the same measures."""
    cfg = nlref.NonLocalConfig(in_channels=4, pairwise="embedded_gaussian", sub_sample=(2, 2))
    params = nlref.init_params(cfg, rng=0, scheme="random")
    x = np.random.default_rng(1).standard_normal((2, 4, 6, 8))
    _, whole = nlref.forward(x, params, cfg, training=False)
    _, tiled = nlref.forward(x, params, cfg, training=False, chunk_size=5)
    with pytest.raises(nlref.AttentionNotStoredError):
        tiled.attention  # noqa: B018
    from_array = analysis.summarise(whole.attention)
    for cache in (whole, tiled):
        s = analysis.summarise(cache, rows_per_block=7)
        for field in ("entropy", "distance", "mean_row", "received", "query_dependence"):
            np.testing.assert_allclose(
                getattr(s, field), getattr(from_array, field), rtol=1e-12, atol=1e-15
            )
    assert analysis.attention_shape(tiled) == (2, 48, 12)
    blocks = list(analysis.row_blocks(tiled, 10))
    assert [b.shape for b in blocks] == [(2, 10, 12)] * 4 + [(2, 8, 12)]


def test_two_dimensional_input_and_errors():
    a = rows()[0]
    assert analysis.summarise(a).entropy.shape == (1, 9)
    with pytest.raises(ValueError, match=r"\(B, N, N′\)"):
        analysis.summarise(np.ones(4))


def test_top_keys(xp):
    host = np.array([[0.1, 0.5, 0.2, 0.5], [0.4, 0.3, 0.2, 0.1]])
    index, weight = analysis.top_keys(xp.asarray(host), 3)
    np.testing.assert_array_equal(nlref.to_numpy(index), [[1, 3, 2], [0, 1, 2]])  # ties: first
    np.testing.assert_array_equal(nlref.to_numpy(weight), [[0.5, 0.5, 0.2], [0.4, 0.3, 0.2]])
    with pytest.raises(ValueError, match="k must be"):
        analysis.top_keys(host, 5)
