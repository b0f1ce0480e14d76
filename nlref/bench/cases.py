"""The cases of ``nlref bench``: a block configuration, an input shape and a PyTorch peer."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["CASES", "REFERENCE_LABELS", "BenchCase", "inputs"]

#: The PyTorch peer of a case, as the report names it.
REFERENCE_LABELS = {
    "torch": "torch eager",
    "torch_materialising": "torch materialising",
}


@dataclass(frozen=True)
class BenchCase:
    """One benchmark: a block configuration, an input shape and the PyTorch peer.

    Attributes
    ----------
    name : str
    pairwise : str
        A registered pairwise function that the PyTorch twin knows
        (:data:`nlref.bench.twin.FORMULAS`).
    shape : tuple of int
        (B, C, *S).
    reference : {"torch", "torch_materialising"}
        The peer: PyTorch eager as AlexHex7 and mmcv write it (1×1 convolutions,
        ``matmul``, ``softmax``, batch norm; :mod:`nlref.bench.twin`).
        ``torch_materialising`` builds the concatenation's (B, 2C′, N, N′) pairs tensor and
        projects it with a 1×1 convolution, as they do; ``torch`` uses the memory-frugal
        split w_θᵀθᵢ + w_φᵀφⱼ.
    norm : {"batchnorm", None}
    sub_sample : tuple of int or None
    default : bool
        Run by ``nlref bench`` without ``--case``.
    """

    name: str
    pairwise: str
    shape: tuple[int, ...]
    reference: str = "torch"
    norm: str | None = "batchnorm"
    sub_sample: tuple[int, ...] | None = None
    default: bool = True

    def __post_init__(self) -> None:
        if self.reference not in REFERENCE_LABELS:
            raise ValueError(
                f"reference must be one of {tuple(REFERENCE_LABELS)}, got {self.reference!r}"
            )

    @property
    def materialise(self) -> bool:
        """Whether the PyTorch peer materialises the concatenation's pairs tensor."""
        return self.reference == "torch_materialising"

    def config(self) -> Any:
        """The :class:`nlref.NonLocalConfig` of the case."""
        from ..config import NonLocalConfig

        return NonLocalConfig(
            in_channels=self.shape[1],
            pairwise=self.pairwise,
            norm=self.norm,
            sub_sample=self.sub_sample,
        )

    def describe(self) -> str:
        """One line: variant, shapes, norm."""
        b, c, *spatial = self.shape
        n = math.prod(spatial)
        return (
            f"{self.pairwise}, B={b}, C={c}, C'={self.config().inter_channels}, "
            f"S={'x'.join(map(str, spatial))} (N={n}), {self.norm or 'no norm'}, fwd+bwd"
        )

    def to_json(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict; :meth:`from_json` rebuilds the case."""
        return asdict(self)

    @classmethod
    def from_json(cls, fields: dict[str, Any]) -> BenchCase:
        """The case from :meth:`to_json`'s dict (lists back to tuples)."""
        fields = dict(fields)
        fields["shape"] = tuple(fields["shape"])
        if fields.get("sub_sample") is not None:
            fields["sub_sample"] = tuple(fields["sub_sample"])
        return cls(**fields)


#: The cases of ``nlref bench --list``.
CASES: dict[str, BenchCase] = {
    c.name: c
    for c in (
        BenchCase("eg-1k", "embedded_gaussian", (2, 256, 32, 32)),
        BenchCase("concat-1k", "concatenation", (2, 256, 32, 32), "torch_materialising"),
        BenchCase("eg-16k", "embedded_gaussian", (1, 64, 128, 128)),
        BenchCase("gaussian-1k", "gaussian", (2, 256, 32, 32), default=False),
        BenchCase("dot-1k", "dot_product", (2, 256, 32, 32), default=False),
        BenchCase("concat-1k-eager", "concatenation", (2, 256, 32, 32), default=False),
    )
}


def inputs(case: BenchCase, seed: int) -> tuple[Any, np.ndarray, np.ndarray, dict[str, Any]]:
    """The config, x, dz (N(0, 1)) and parameters (``scheme="random"``) of a case, float32.

    The same seed gives the same arrays in every process, so both sides compute on the
    same numbers.
    """
    from ..params import init_params

    cfg = case.config()
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(case.shape).astype(np.float32)
    dz = rng.standard_normal(case.shape).astype(np.float32)
    params = init_params(cfg, rng=seed + 1, scheme="random", dtype="float32")
    return cfg, x, dz, params
