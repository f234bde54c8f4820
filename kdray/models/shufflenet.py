"""ShuffleNet V1 (Zhang et al., CVPR 2018) and V2 (Ma et al., ECCV 2018) for CIFAR, as in RepDistiller
(Tian et al., ICLR 2020; models/ShuffleNetv1.py, models/ShuffleNetv2.py): a 1x1 stem without pooling,
three stride-2 groups, global average pooling and one linear layer. V1 uses 3 groups and widths
240-480-960; V2 its 1x width (116-232-464, last conv 1024).

Stages: ``stem``, ``layer1..3`` (and ``last``, V2's 1x1 conv to 1024).
"""

from __future__ import annotations

import torch
from torch import nn

from kdray.models.registry import MODELS, ModelInfo, ModelSpec
from kdray.models.staged import PooledLinearHead, StagedNet, init_weights, norm2d


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, g·c, H, W] -> interleave the g groups' channels (Zhang et al. 2018, Fig. 1)."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def conv_bn(conv: nn.Conv2d, info: ModelInfo, relu: bool) -> nn.Sequential:
    layers = [conv, norm2d(conv.out_channels, info.batchnorm)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


def stem(info: ModelInfo) -> nn.Sequential:
    return conv_bn(nn.Conv2d(info.in_channels, 24, 1, bias=False), info, relu=True)


class ShuffleV1Block(nn.Module):
    """Grouped 1x1, shuffle, depthwise 3x3, grouped 1x1; at stride 2 the 3x3-average-pooled input is
    concatenated (so the block adds ``in_channels`` to its output), else added."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int, info: ModelInfo) -> None:
        super().__init__()
        mid = out_channels // 4
        self.first_groups = 1 if in_channels == 24 else groups  # the stem's 24 channels are not grouped
        self.stride = stride
        self.reduce = conv_bn(nn.Conv2d(in_channels, mid, 1, groups=self.first_groups, bias=False), info, relu=True)
        self.depthwise = conv_bn(nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), info, relu=True)
        self.expand = conv_bn(nn.Conv2d(mid, out_channels, 1, groups=groups, bias=False), info, relu=False)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand(self.depthwise(channel_shuffle(self.reduce(x), self.first_groups)))
        res = self.shortcut(x)
        return torch.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


def shufflenet_v1(
    info: ModelInfo, widths: tuple[int, ...] = (240, 480, 960), blocks: tuple[int, ...] = (4, 8, 4)
) -> StagedNet:
    groups = 3
    stages: list[tuple[str, nn.Module]] = [("stem", stem(info))]
    channels = 24
    for index, (width, count) in enumerate(zip(widths, blocks, strict=True), start=1):
        layer = []
        for block in range(count):
            first = block == 0
            layer.append(ShuffleV1Block(channels, width - (channels if first else 0), 2 if first else 1, groups, info))
            channels = width
        stages.append((f"layer{index}", nn.Sequential(*layer)))
    model = StagedNet(stages, PooledLinearHead(channels, info.num_classes))
    init_weights(model)
    return model


class ShuffleV2Block(nn.Module):
    """Half the channels pass through; the other half get 1x1, depthwise 3x3, 1x1; then a shuffle."""

    def __init__(self, channels: int, info: ModelInfo) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            *conv_bn(nn.Conv2d(half, half, 1, bias=False), info, relu=True),
            *conv_bn(nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False), info, relu=False),
            *conv_bn(nn.Conv2d(half, half, 1, bias=False), info, relu=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        passed, worked = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([passed, self.branch(worked)], 1), 2)


class ShuffleV2Down(nn.Module):
    """Stride 2: both halves see the whole input (depthwise 3x3 s2 + 1x1; 1x1 + depthwise 3x3 s2 + 1x1)."""

    def __init__(self, in_channels: int, out_channels: int, info: ModelInfo) -> None:
        super().__init__()
        mid = out_channels // 2
        self.left = nn.Sequential(
            *conv_bn(nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False), info, relu=False),
            *conv_bn(nn.Conv2d(in_channels, mid, 1, bias=False), info, relu=True),
        )
        self.right = nn.Sequential(
            *conv_bn(nn.Conv2d(in_channels, mid, 1, bias=False), info, relu=True),
            *conv_bn(nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False), info, relu=False),
            *conv_bn(nn.Conv2d(mid, mid, 1, bias=False), info, relu=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1), 2)


def shufflenet_v2(
    info: ModelInfo, widths: tuple[int, ...] = (116, 232, 464, 1024), blocks: tuple[int, ...] = (3, 7, 3)
) -> StagedNet:
    stages: list[tuple[str, nn.Module]] = [("stem", stem(info))]
    channels = 24
    for index, (width, count) in enumerate(zip(widths[:3], blocks, strict=True), start=1):
        layer = [ShuffleV2Down(channels, width, info), *(ShuffleV2Block(width, info) for _ in range(count))]
        stages.append((f"layer{index}", nn.Sequential(*layer)))
        channels = width
    stages.append(("last", conv_bn(nn.Conv2d(channels, widths[3], 1, bias=False), info, relu=True)))
    model = StagedNet(stages, PooledLinearHead(widths[3], info.num_classes))
    init_weights(model)
    return model


MODELS.add(
    "shufflenetv1",
    ModelSpec(
        shufflenet_v1,
        "RepDistiller models/ShuffleNetv1.py ShuffleV1 (Tian et al. 2020), Zhang et al. 2018",
        onthefly=False,
    ),
)
MODELS.add(
    "shufflenetv2",
    ModelSpec(
        shufflenet_v2,
        "RepDistiller models/ShuffleNetv2.py ShuffleV2 (Tian et al. 2020), Ma et al. 2018",
        onthefly=False,
    ),
)
