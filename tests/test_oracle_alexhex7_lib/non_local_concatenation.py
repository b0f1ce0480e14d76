"""AlexHex7's concatenation: ReLU(w_fᵀ[θᵢ; φⱼ]) / N′, materialising B×2C′×N×N′."""

from __future__ import annotations

import torch
from torch import nn

from ._base import build


class _NonLocalBlockND(nn.Module):
    def __init__(
        self, in_channels, inter_channels=None, dimension=3, sub_sample=True, bn_layer=True
    ):
        super().__init__()
        build(
            self,
            in_channels,
            inter_channels,
            dimension,
            sub_sample,
            bn_layer,
            embed=True,
            concat=True,
        )

    def forward(self, x, return_nl_map=False):
        batch_size = x.size(0)
        g_x = self.g(x).view(batch_size, self.inter_channels, -1).permute(0, 2, 1)
        theta_x = self.theta(x).view(batch_size, self.inter_channels, -1, 1)  # (B, C', N, 1)
        phi_x = self.phi(x).view(batch_size, self.inter_channels, 1, -1)  # (B, C', 1, N')
        n, n_keys = theta_x.size(2), phi_x.size(3)
        pairs = torch.cat([theta_x.repeat(1, 1, 1, n_keys), phi_x.repeat(1, 1, n, 1)], dim=1)
        f = self.concat_project(pairs)  # (B, 1, N, N')
        b, _, h, w = f.size()
        f = f.view(b, h, w)
        f_div_c = f / f.size(-1)
        y = torch.matmul(f_div_c, g_x).permute(0, 2, 1).contiguous()
        y = y.view(batch_size, self.inter_channels, *x.size()[2:])
        z = self.W(y) + x
        return (z, f_div_c) if return_nl_map else z


class NONLocalBlock1D(_NonLocalBlockND):
    def __init__(self, in_channels, inter_channels=None, sub_sample=True, bn_layer=True):
        super().__init__(in_channels, inter_channels, 1, sub_sample, bn_layer)


class NONLocalBlock2D(_NonLocalBlockND):
    def __init__(self, in_channels, inter_channels=None, sub_sample=True, bn_layer=True):
        super().__init__(in_channels, inter_channels, 2, sub_sample, bn_layer)


class NONLocalBlock3D(_NonLocalBlockND):
    def __init__(self, in_channels, inter_channels=None, sub_sample=True, bn_layer=True):
        super().__init__(in_channels, inter_channels, 3, sub_sample, bn_layer)
