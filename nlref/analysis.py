r"""Why does my map look uniform? Measures of an attention, for any size and any backend.

Every function takes the attention A = f / C(x) as :func:`nlref.forward` gives it: the
array ``cache.attention`` (B, N, N′) or (N, N′), or the cache itself. From a cache the
rows are read in blocks with ``cache.attention_rows``, so an attention that the engine
evaluated in tiles (and never held whole) works too, in the memory of one block.

Rows as distributions
---------------------
Row i is read as a distribution over the N′ keys,

.. math::

    p_{ij} = \frac{|A_{ij}|}{\sum_k |A_{ik}|},

which is the row itself for the softmax variants (their rows are non-negative and sum to
1), the row divided by its sum for the concatenation (f / N′ ≥ 0), and the distribution of
the magnitudes for the dot product, whose entries can be negative. A row of zeros (a
concatenation whose ReLU is off for every key) is no distribution: its measures are NaN,
and the averages over queries leave it out.

The measures
------------
- :func:`entropy_fraction`: :math:`H(p_i) / \log N'`, the row's entropy as a fraction of
  the uniform row's. 1: the query looks everywhere alike; near 0: at one key.
- :func:`distance_to_mean`: the Jensen–Shannon distance (base 2, in [0, 1]) between
  :math:`p_i` and the mean row :math:`\bar p = \frac1N \sum_i p_i`:

  .. math::

      D_i = \sqrt{\tfrac12 \mathrm{KL}(p_i \,\|\, m_i) + \tfrac12 \mathrm{KL}(\bar p \,\|\, m_i)},
      \qquad m_i = \tfrac12 (p_i + \bar p).

  0: the query's map is the average map.
- :func:`query_dependence`: the mean of :math:`D_i` over the queries. 0 means every query
  looks at the same keys: the attention is **query-independent**, as GCNet (Cao et al.,
  2019) found for many trained non-local blocks, and a single global map would do.
- :func:`received_attention`: :math:`\sum_i A_{ij}`, how much attention key j receives in
  total (the raw A, not p).

:func:`summarise` computes all of them in two passes over the rows.

Results are arrays of the attention's own library (NumPy, CuPy, array-api-strict, PyTorch,
JAX), with the batch axis first: (B, N) per query, (B, N′) per key, (B,) per sample.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ._backend import Array, namespace

__all__ = [
    "AttentionSummary",
    "attention_shape",
    "distance_to_mean",
    "entropy_fraction",
    "query_dependence",
    "received_attention",
    "row_blocks",
    "row_distributions",
    "summarise",
    "top_keys",
]

#: Bytes of one block of rows read at a time from a cache (or an array).
BLOCK_BYTES = 8 * 2**20


@dataclass(frozen=True)
class AttentionSummary:
    """The measures of one attention (see the module docstring), batch axis first.

    Attributes
    ----------
    entropy : array, shape (B, N)
        Row entropy as a fraction of the uniform row's (NaN for a row of zeros).
    distance : array, shape (B, N)
        Jensen–Shannon distance of each row to the mean row, in [0, 1].
    mean_row : array, shape (B, N′)
        The mean of the rows read as distributions, :math:`\\bar p`.
    received : array, shape (B, N′)
        The attention each key receives, summed over the queries.
    query_dependence : array, shape (B,)
        The mean of ``distance`` over the queries (0: query-independent).
    """

    entropy: Array
    distance: Array
    mean_row: Array
    received: Array
    query_dependence: Array


# --------------------------------------------------------------------------- reading rows


def attention_shape(attention: Any) -> tuple[int, int, int]:
    """(B, N, N′) of an attention array or of a forward cache's attention."""
    b, n, n_keys, _ = _shape(attention)
    return b, n, n_keys


def _shape(attention: Any) -> tuple[int, int, int, bool]:
    """(B, N, N′, squeeze): squeeze when a 2D (N, N′) array was given."""
    if hasattr(attention, "attention_rows"):  # BlockCache or engine.EngineCache
        b, _, *spatial = attention.input_shape
        return b, math.prod(spatial), math.prod(attention.key_shape), False
    shape = tuple(attention.shape)
    if len(shape) == 2:
        return 1, shape[0], shape[1], True
    if len(shape) != 3:
        raise ValueError(
            f"expected an attention of shape (B, N, N′) or (N, N′), or a forward cache; "
            f"got shape {shape}"
        )
    return shape[0], shape[1], shape[2], False


def row_blocks(attention: Any, rows_per_block: int | None = None) -> Iterator[Array]:
    """The rows of an attention in blocks of consecutive queries, each (B, k, N′).

    Parameters
    ----------
    attention : array (B, N, N′) or (N, N′), or a forward cache
        From a cache the rows come from ``cache.attention_rows`` (recomputed when the
        forward ran in tiles).
    rows_per_block : int, optional
        k; default about 8 MiB of float64 a block (:data:`BLOCK_BYTES`).
    """
    b, n, n_keys, squeeze = _shape(attention)
    step = rows_per_block or max(1, BLOCK_BYTES // (8 * b * max(n_keys, 1)))
    from_cache = hasattr(attention, "attention_rows")
    for i0 in range(0, n, step):
        i1 = min(n, i0 + step)
        if from_cache:
            yield attention.attention_rows(i0, i1)
        elif squeeze:
            yield attention[None, i0:i1, :]
        else:
            yield attention[:, i0:i1, :]


def row_distributions(rows: Array) -> Array:
    """Rows read as distributions over the keys: :math:`|A_{ij}| / \\sum_k |A_{ik}|`.

    Parameters
    ----------
    rows : array, shape (..., N′)

    Returns
    -------
    array, like ``rows``
        Each row sums to 1; a row of zeros becomes NaN.
    """
    xp = namespace(rows)
    magnitude = xp.abs(rows)
    total = xp.sum(magnitude, axis=-1, keepdims=True)
    safe = xp.where(total > 0, total, xp.ones_like(total))
    return xp.where(total > 0, magnitude / safe, xp.full_like(magnitude, math.nan))


def _xlogy(xp: Any, p: Array, q: Array) -> Array:
    """p·log(q), with 0·log(anything) = 0."""
    return xp.where(p > 0, p * xp.log(xp.where(p > 0, q, xp.ones_like(q))), xp.zeros_like(p))


def _entropy_fraction(p: Array, n_keys: int) -> Array:
    xp = namespace(p)
    zero_row = xp.isnan(p[..., 0])  # row_distributions made the whole row NaN
    if n_keys == 1:
        fraction = xp.ones_like(p[..., 0])  # one key: every row is the uniform row
    else:
        fraction = -xp.sum(_xlogy(xp, p, p), axis=-1) / math.log(n_keys)
    return xp.where(zero_row, p[..., 0], fraction)


def _js_distance(p: Array, mean: Array) -> Array:
    """Jensen–Shannon distance (base 2) between rows p (B, k, N′) and mean (B, 1, N′)."""
    xp = namespace(p)
    m = 0.5 * (p + mean)
    kl_p = xp.sum(_xlogy(xp, p, p) - _xlogy(xp, p, m), axis=-1)
    kl_mean = xp.sum(_xlogy(xp, mean, mean) - _xlogy(xp, mean, m), axis=-1)
    divergence = (0.5 * kl_p + 0.5 * kl_mean) / math.log(2.0)
    # rounding can leave a divergence of -1e-17 where p equals the mean
    distance = xp.sqrt(xp.where(divergence > 0, divergence, xp.zeros_like(divergence)))
    return xp.where(xp.isnan(p[..., 0]), p[..., 0], distance)  # rows of zeros: NaN


def _nan_mean(xp: Any, values: Array, axis: int) -> Array:
    """Mean over ``axis`` leaving NaN out (NaN when every value is NaN)."""
    ok = ~xp.isnan(values)
    count = xp.sum(xp.astype(ok, values.dtype), axis=axis)
    total = xp.sum(xp.where(ok, values, xp.zeros_like(values)), axis=axis)
    safe = xp.where(count > 0, count, xp.ones_like(count))
    return xp.where(count > 0, total / safe, xp.full_like(total, math.nan))


# --------------------------------------------------------------------------- measures


def summarise(attention: Any, *, rows_per_block: int | None = None) -> AttentionSummary:
    """Every measure of the module docstring, in two passes over the rows.

    Parameters
    ----------
    attention : array (B, N, N′) or (N, N′), or a forward cache
        From a cache (:class:`nlref.BlockCache` or :class:`nlref.engine.EngineCache`) the
        rows are read with ``cache.attention_rows``, so a tiled attention works.
    rows_per_block : int, optional
        Rows read at a time; default about 8 MiB of float64 a block.

    Returns
    -------
    AttentionSummary
        Arrays of the attention's library; a 2D input still gives B = 1.
    """
    _, _, n_keys, _ = _shape(attention)
    xp = None
    entropy, received, mean_sum, count = [], None, None, None
    for rows in row_blocks(attention, rows_per_block):  # pass 1: entropy, received, mean
        xp = namespace(rows)
        p = row_distributions(rows)
        entropy.append(_entropy_fraction(p, n_keys))
        valid = ~xp.isnan(p[..., :1])  # (B, k, 1)
        part = xp.sum(xp.where(valid, p, xp.zeros_like(p)), axis=1)
        part_count = xp.sum(xp.astype(valid, p.dtype), axis=1)
        block_received = xp.sum(rows, axis=1)
        received = block_received if received is None else received + block_received
        mean_sum = part if mean_sum is None else mean_sum + part
        count = part_count if count is None else count + part_count
    assert xp is not None  # N >= 1
    mean_row = mean_sum / xp.where(count > 0, count, xp.ones_like(count))  # (B, N′)
    mean_row = xp.where(count > 0, mean_row, xp.full_like(mean_row, math.nan))
    distance = [  # pass 2: the distance of each row to the mean row
        _js_distance(row_distributions(rows), mean_row[:, None, :])
        for rows in row_blocks(attention, rows_per_block)
    ]
    distance_all = xp.concat(distance, axis=1)
    return AttentionSummary(
        entropy=xp.concat(entropy, axis=1),
        distance=distance_all,
        mean_row=mean_row,
        received=received,
        query_dependence=_nan_mean(xp, distance_all, axis=1),
    )


def entropy_fraction(attention: Any) -> Array:
    """Entropy of each row as a fraction of the uniform row's, :math:`H(p_i)/\\log N'`.

    Parameters
    ----------
    attention : array (B, N, N′) or (N, N′), or a forward cache

    Returns
    -------
    array, shape (B, N)
        In [0, 1]: 1 for a uniform row, 0 for a row on one key (NaN for a row of zeros).
    """
    _, _, n_keys, _ = _shape(attention)
    parts = [_entropy_fraction(row_distributions(r), n_keys) for r in row_blocks(attention)]
    return namespace(parts[0]).concat(parts, axis=1)


def distance_to_mean(attention: Any) -> Array:
    """Jensen–Shannon distance (base 2) of each row to the mean row, (B, N), in [0, 1]."""
    return summarise(attention).distance


def query_dependence(attention: Any) -> Array:
    """Mean Jensen–Shannon distance of the rows to the mean row, (B,), in [0, 1].

    0 when every query attends to the same keys (a query-independent attention); larger
    when queries look at different keys. The mean over the queries leaves rows of zeros
    out.
    """
    return summarise(attention).query_dependence


def received_attention(attention: Any) -> Array:
    """The attention each key receives: :math:`\\sum_i A_{ij}`, shape (B, N′).

    For the softmax variants the total over the keys is N; a key that no query looks at
    receives 0.
    """
    total = None
    for rows in row_blocks(attention):
        part = namespace(rows).sum(rows, axis=1)
        total = part if total is None else total + part
    return total


def top_keys(rows: Array, k: int) -> tuple[Array, Array]:
    """The k keys with the largest weight in each row, largest first.

    Parameters
    ----------
    rows : array, shape (..., N′)
    k : int
        At most N′.

    Returns
    -------
    index : array of int, shape (..., k)
        Flat key indices j (row-major on the key grid).
    weight : array, shape (..., k)
        A_ij at those keys.
    """
    xp = namespace(rows)
    n_keys = rows.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_keys:
        raise ValueError(f"k must be an int in [1, N′={n_keys}], got {k!r}")
    order = xp.argsort(rows, axis=-1, descending=True, stable=True)[..., :k]
    return order, xp.take_along_axis(rows, order, axis=-1)
