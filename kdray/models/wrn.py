"""Wide residual networks WRN-d-w (Zagoruyko & Komodakis, BMVC 2016), pre-activation blocks, no dropout.

Depth 6n+4 with three stages of n blocks at widths 16w, 32w, 64w. The final BatchNorm and ReLU sit at
the end of ``layer3`` so the stage output is the activated feature map the head pools.
"""

from __future__ import annotations

import torch
from torch import nn

from kdray.models.registry import MODELS, ModelInfo, ModelSpec
from kdray.models.staged import PooledLinearHead, StagedNet, conv3x3, init_weights, norm2d


class PreActBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, info: ModelInfo) -> None:
        super().__init__()
        self.bn1 = norm2d(in_channels, info.batchnorm)
        self.conv1 = conv3x3(in_channels, out_channels, stride, info.onthefly)
        self.bn2 = norm2d(out_channels, info.batchnorm)
        self.conv2 = conv3x3(out_channels, out_channels, onthefly=info.onthefly)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(self.bn1(x))
        out = self.conv2(torch.relu(self.bn2(self.conv1(pre))))
        # As in the reference code, a projection shortcut reads the pre-activated input.
        return out + (x if self.shortcut is None else self.shortcut(pre))


def wide_resnet(depth: int, widen: int, info: ModelInfo) -> StagedNet:
    """Stages: ``stem`` (one conv), ``layer1..3`` (layers 2 and 3 halve the size)."""
    if (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6n+4, got {depth}")
    blocks = (depth - 4) // 6
    widths = (16 * widen, 32 * widen, 64 * widen)
    stages: list[tuple[str, nn.Module]] = [("stem", conv3x3(info.in_channels, 16, onthefly=info.onthefly))]
    channels = 16
    for index, (width, stride) in enumerate(zip(widths, (1, 2, 2), strict=True), start=1):
        layer: list[nn.Module] = [
            PreActBlock(channels if b == 0 else width, width, stride if b == 0 else 1, info) for b in range(blocks)
        ]
        if index == 3:
            layer += [norm2d(width, info.batchnorm), nn.ReLU(inplace=True)]
        stages.append((f"layer{index}", nn.Sequential(*layer)))
        channels = width
    model = StagedNet(stages, PooledLinearHead(channels, info.num_classes))
    init_weights(model)
    return model


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2), (40, 4), (28, 10)):
    MODELS.add(
        f"wrn_{_depth}_{_widen}",
        ModelSpec(
            lambda info, d=_depth, w=_widen: wide_resnet(d, w, info),
            "Zagoruyko & Komodakis 2016; widths as in RepDistiller models/wrn.py",
        ),
    )
