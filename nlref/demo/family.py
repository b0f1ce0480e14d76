r"""GCNet and the disentangled non-local block on a photo's features, with hand-set weights.

:mod:`nlref.demo.photo` gives the Non-local block identity embeddings on colour + position
features x (C, N): θ = φ = g = x, and the embedded Gaussian's row i is
:math:`\operatorname{softmax}_j(\alpha\, x_i^\top x_j)`. Write each feature as its mean
over the positions plus the rest, :math:`x_j = \mu + \hat x_j`. Then

.. math::

    \alpha\, x_i^\top x_j = \underbrace{\alpha\, \hat x_i^\top \hat x_j}_{\text{pairwise}}
    + \underbrace{\alpha\, \mu^\top x_j}_{\text{unary}} + c_i,

and :math:`c_i` does not depend on the key j, so the softmax drops it. The embedded
Gaussian's row is therefore the renormalised product of two distributions over the keys:
the whitened pairwise row :math:`A_{ij} = \operatorname{softmax}_j(\alpha\hat x_i^\top
\hat x_j)` and one map shared by every query, :math:`u_j = \operatorname{softmax}_j(\alpha
\mu^\top x_j)`:

.. math::

    \operatorname{softmax}_j(\alpha\, x_i^\top x_j) = \frac{A_{ij}\, u_j}{\sum_k A_{ik}\, u_k}.

The two successors keep these parts differently, and the hand-set weights here make each
one compute exactly them:

- **DNL** (:func:`dnl_params`): θ = φ = g = identity, scale α, τ = 1, and the unary
  projection w_m = α μ. Its pairwise term is A, its unary term is u, and it *adds* them:
  y_i = Σⱼ (A_ij + u_j) g_j, where the embedded Gaussian multiplies them inside one
  softmax.
- **GCNet** (:func:`gcnet_params`): w_k = α μ, b_k = 0. Its one map is u: GCNet keeps only
  the query-independent factor.

(Without sub-sampling. With a pooled key grid, φ's mean is over the pooled keys and the
identity above holds only approximately.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._backend import to_numpy
from ..family import DNLConfig, GCNetConfig, dnl, gcnet
from .photo import block_caches

__all__ = ["dnl_params", "family_caches", "feature_mean", "gcnet_params"]


def feature_mean(x: Any) -> np.ndarray:
    """μ, the mean feature over the positions of the first sample, (C,)."""
    host = np.asarray(to_numpy(x), dtype=np.float64)
    return host[0].reshape(host.shape[1], -1).mean(axis=1)


def gcnet_params(x: Any, scale: float) -> tuple[GCNetConfig, dict[str, np.ndarray]]:
    """A GCNet block whose attention is the embedded Gaussian's query-independent factor u:
    w_k = α μ, b_k = 0, one ``channel_add`` transform of zeros (the output is x; only the
    map matters here)."""
    c = np.shape(x)[1]
    cfg = GCNetConfig(in_channels=c, inter_channels=1, pooling="att", fusion=("channel_add",))
    params = {
        "mask.weight": scale * feature_mean(x)[None, :],
        "mask.bias": np.zeros(1),
        "channel_add.fc1.weight": np.zeros((1, c)),
        "channel_add.fc1.bias": np.zeros(1),
        "channel_add.norm.weight": np.ones(1),
        "channel_add.norm.bias": np.zeros(1),
        "channel_add.fc2.weight": np.zeros((c, 1)),
        "channel_add.fc2.bias": np.zeros(c),
    }
    return cfg, params


def dnl_params(
    x: Any, scale: float, sub_sample: tuple[int, ...] | None = None
) -> tuple[DNLConfig, dict[str, np.ndarray]]:
    """A DNL block that splits the hand-set embedded Gaussian into its two terms:
    θ = φ = g = identity, α = ``scale``, τ = 1, w_m = α μ, b_m = 0, W_z = 0, no norm, no
    biases."""
    c = np.shape(x)[1]
    cfg = DNLConfig(
        in_channels=c, inter_channels=c, scale=scale, sub_sample=sub_sample, norm=None, biases=()
    )
    eye = np.eye(c)
    params = {
        "theta.weight": eye,
        "phi.weight": eye,
        "g.weight": eye,
        "mask.weight": scale * feature_mean(x)[None, :],
        "mask.bias": np.zeros(1),
        "z.weight": np.zeros((c, c)),
    }
    return cfg, params


def family_caches(
    x: Any, *, scale: float, sub_sample: tuple[int, ...] | None = None
) -> dict[str, Any]:
    """The hand-set embedded Gaussian, GCNet and DNL on features x (1, C, \\*S), float64.

    Returns
    -------
    dict
        ``"embedded_gaussian"``: :func:`nlref.forward`'s cache (:func:`nlref.demo.photo.
        block_caches`); ``"gcnet"``: :func:`nlref.family.gcnet.forward`'s cache (its
        ``attention`` is u, (1, 1, N)); ``"dnl"``: :func:`nlref.family.dnl.forward`'s
        cache (``attention`` is A, (1, N, N′), ``unary_attention`` is u, (1, 1, N′)).
    """
    host = np.asarray(to_numpy(x), dtype=np.float64)
    out = block_caches(host, variants=["embedded_gaussian"], scale=scale, sub_sample=sub_sample)
    cfg, params = gcnet_params(host, scale)
    _, out["gcnet"] = gcnet.forward(host, params, cfg, training=False)
    cfg, params = dnl_params(host, scale, sub_sample)
    _, out["dnl"] = dnl.forward(host, params, cfg, training=False)
    return out
