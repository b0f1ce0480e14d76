"""Hand-written Non-local blocks, as users write them, for the oracle's tests.

Import this module only after ``require("torch")``: it imports torch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nlref.interop.torch import Layout

#: The layout of :class:`QKVBlock`: the naming most hand-written blocks use.
QKV_LAYOUT = Layout(theta="query_conv", phi="key_conv", g="value_conv", z="out_conv", bn="out_bn")


class QKVBlock(nn.Module):
    """An embedded-Gaussian block with ``query_conv``/``key_conv``/``value_conv``/``out_conv``.

    ``scale``: the logits' factor ("inner" for 1/√C′, "in" for 1/√C, or a number);
    ``pool``: a max-pool kernel applied to x before the key and value projections (or
    after them, with ``pool_after``); ``bn_eval``: the batch norm stays in eval mode (a
    frozen BN, as mmdetection's ``norm_eval=True``); ``drop_bias``: the output conv's
    bias is never added; ``softmax``: False divides by N′ instead (a dot product).
    """

    def __init__(
        self,
        channels: int,
        inner: int,
        *,
        scale: Any = "inner",
        pool: tuple[int, int] | None = None,
        pool_after: bool = False,
        bn: bool = True,
        bn_eval: bool = False,
        drop_bias: bool = False,
        softmax: bool = True,
    ) -> None:
        super().__init__()
        self.query_conv = nn.Conv2d(channels, inner, 1)
        self.key_conv = nn.Conv2d(channels, inner, 1)
        self.value_conv = nn.Conv2d(channels, inner, 1)
        self.out_conv = nn.Conv2d(inner, channels, 1)
        self.out_bn = nn.BatchNorm2d(channels) if bn else None
        self.pool = nn.MaxPool2d(pool) if pool else None
        self.pool_after = pool_after
        factors = {"inner": inner**-0.5, "in": channels**-0.5, None: 1.0}
        self.scale = factors.get(scale, scale)
        self.bn_eval, self.drop_bias, self.softmax = bn_eval, drop_bias, softmax

    def train(self, mode: bool = True) -> QKVBlock:
        super().train(mode)
        if self.bn_eval and self.out_bn is not None:
            self.out_bn.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        kv = x if self.pool is None or self.pool_after else self.pool(x)
        q = self.query_conv(x).flatten(2).transpose(1, 2)  # (B, N, C')
        k, v = self.key_conv(kv), self.value_conv(kv)
        if self.pool is not None and self.pool_after:
            k, v = self.pool(k), self.pool(v)
        k, v = k.flatten(2), v.flatten(2).transpose(1, 2)  # (B, C', N'), (B, N', C')
        logits = q @ k * self.scale
        a = logits.softmax(dim=-1) if self.softmax else logits / k.shape[-1]
        y = (a @ v).transpose(1, 2).reshape(b, -1, h, w)
        if self.drop_bias:
            y = nn.functional.conv2d(y, self.out_conv.weight)
        else:
            y = self.out_conv(y)
        return x + (y if self.out_bn is None else self.out_bn(y))


#: The layout of :class:`TokenBlock`: nn.Linear projections on channels-last tokens.
TOKEN_LAYOUT = Layout(
    theta="q", phi="k", g="v", z="proj", kind="linear", channels_last=True,
    config={"pairwise": "embedded_gaussian", "scale": None},
)  # fmt: skip


class TokenBlock(nn.Module):
    """A Non-local block on tokens (B, H, W, C) with ``nn.Linear`` projections."""

    def __init__(self, channels: int, inner: int) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(channels, inner) for _ in range(3))
        self.proj = nn.Linear(inner, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.flatten(1, -2)  # (B, N, C)
        a = (self.q(t) @ self.k(t).transpose(1, 2)).softmax(dim=-1)
        return x + self.proj(a @ self.v(t)).reshape(x.shape)


def make_qkv() -> QKVBlock:
    """A :class:`QKVBlock` with C = 8, C′ = 4 (for ``nlref compare --module``)."""
    return QKVBlock(8, 4)
