"""The constructor shared by the four AlexHex7 variants (sub-modules, pools, init)."""

from __future__ import annotations

from torch import nn

_LAYERS = {
    1: (nn.Conv1d, lambda: nn.MaxPool1d(kernel_size=2), nn.BatchNorm1d),
    2: (nn.Conv2d, lambda: nn.MaxPool2d(kernel_size=(2, 2)), nn.BatchNorm2d),
    3: (nn.Conv3d, lambda: nn.MaxPool3d(kernel_size=(1, 2, 2)), nn.BatchNorm3d),
}


def build(
    block: nn.Module,
    in_channels: int,
    inter_channels: int | None,
    dimension: int,
    sub_sample: bool,
    bn_layer: bool,
    *,
    embed: bool,
    concat: bool = False,
) -> None:
    """Give ``block`` AlexHex7's attributes: g, W, theta/phi (``embed``), concat_project."""
    assert dimension in (1, 2, 3)
    block.dimension = dimension
    block.sub_sample = sub_sample
    block.in_channels = in_channels
    block.inter_channels = inter_channels if inter_channels is not None else in_channels // 2
    if block.inter_channels == 0:
        block.inter_channels = 1
    conv, pool, bn = _LAYERS[dimension]
    c, ci = block.in_channels, block.inter_channels

    def conv1(c_in: int, c_out: int) -> nn.Module:
        return conv(in_channels=c_in, out_channels=c_out, kernel_size=1, stride=1, padding=0)

    block.g = conv1(c, ci)
    if bn_layer:
        block.W = nn.Sequential(conv1(ci, c), bn(c))
        nn.init.constant_(block.W[1].weight, 0)
        nn.init.constant_(block.W[1].bias, 0)
    else:
        block.W = conv1(ci, c)
        nn.init.constant_(block.W.weight, 0)
        nn.init.constant_(block.W.bias, 0)
    if embed:
        block.theta = conv1(c, ci)
        block.phi = conv1(c, ci)
    if concat:
        block.concat_project = nn.Sequential(nn.Conv2d(2 * ci, 1, 1, 1, 0, bias=False), nn.ReLU())
    if sub_sample:
        max_pool = pool()
        block.g = nn.Sequential(block.g, max_pool)
        block.phi = nn.Sequential(block.phi, max_pool) if embed else max_pool
