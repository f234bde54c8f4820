"""MobileNetV2 for CIFAR as in RepDistiller's ``mobile_half`` (Tian et al., ICLR 2020; models/mobilenetv2.py,
taken from "Knowledge Distillation via Route Constrained Optimization"): Sandler et al. 2018's inverted
residuals at width 0.5 and expansion 6, a stride-2 stem and a 1280-wide last 1x1 conv.

Stages: ``stem`` (conv3x3 s2), ``block0..6`` (the seven inverted-residual groups), ``last`` (1x1 conv to
1280); the head average-pools and applies one linear layer.
"""

from __future__ import annotations

import torch
from torch import nn

from kdray.models.registry import MODELS, ModelInfo, ModelSpec
from kdray.models.staged import PooledLinearHead, StagedNet, conv3x3, norm2d
from kdray.models.vgg import init_vgg

# expansion t, output channels c, blocks n, first stride s (Sandler et al. 2018, Table 2; CIFAR strides)
SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def conv_bn_relu(conv: nn.Conv2d, channels: int, info: ModelInfo) -> nn.Sequential:
    return nn.Sequential(conv, norm2d(channels, info.batchnorm), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, 1x1 linear projection; identity shortcut when the shape allows."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand: int, info: ModelInfo) -> None:
        super().__init__()
        hidden = in_channels * expand
        self.residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            *conv_bn_relu(nn.Conv2d(in_channels, hidden, 1, bias=False), hidden, info),
            *conv_bn_relu(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), hidden, info),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            norm2d(out_channels, info.batchnorm),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


def mobilenetv2(width: float, info: ModelInfo, last_channels: int = 1280) -> StagedNet:
    channels = int(32 * width)
    stem = conv_bn_relu(conv3x3(info.in_channels, channels, stride=2), channels, info)
    stages: list[tuple[str, nn.Module]] = [("stem", stem)]
    for index, (expand, out, blocks, stride) in enumerate(SETTINGS):
        out = int(out * width)
        group = []
        for block in range(blocks):
            group.append(InvertedResidual(channels, out, stride if block == 0 else 1, expand, info))
            channels = out
        stages.append((f"block{index}", nn.Sequential(*group)))
    stages.append(("last", conv_bn_relu(nn.Conv2d(channels, last_channels, 1, bias=False), last_channels, info)))
    model = StagedNet(stages, PooledLinearHead(last_channels, info.num_classes))
    init_vgg(model)  # the same initialisation as RepDistiller's MobileNetV2
    return model


MODELS.add(
    "mobilenetv2",
    ModelSpec(
        lambda info: mobilenetv2(0.5, info),
        "RepDistiller models/mobilenetv2.py mobile_half (Tian et al. 2020), Sandler et al. 2018",
        onthefly=False,
    ),
)
