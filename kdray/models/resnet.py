"""CIFAR ResNets (He et al., "Deep Residual Learning", CVPR 2016, section 4.2).

Depth 6n+2 with three stages of n basic blocks. Widths follow RepDistiller (Tian et al., ICLR 2020):
16-16-32-64 for resnet8..110, and 32-64-128-256 for the "x4" variants resnet8x4 / resnet32x4 used in
its teacher/student table. Downsampling shortcuts are 1x1 convolutions with BatchNorm (option B).
"""

from __future__ import annotations

import torch
from torch import nn

from kdray.models.registry import MODELS, ModelInfo, ModelSpec
from kdray.models.staged import PooledLinearHead, StagedNet, conv3x3, init_weights, norm2d


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, info: ModelInfo) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride, info.onthefly)
        self.bn1 = norm2d(out_channels, info.batchnorm)
        self.conv2 = conv3x3(out_channels, out_channels, onthefly=info.onthefly)
        self.bn2 = norm2d(out_channels, info.batchnorm)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                norm2d(out_channels, info.batchnorm),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def cifar_resnet(depth: int, widths: tuple[int, int, int, int], info: ModelInfo) -> StagedNet:
    """Stages: ``stem`` (conv-bn-relu), ``layer1..3`` (n blocks each; layers 2 and 3 halve the size)."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    blocks = (depth - 2) // 6
    stem = nn.Sequential(
        conv3x3(info.in_channels, widths[0], onthefly=info.onthefly),
        norm2d(widths[0], info.batchnorm),
        nn.ReLU(inplace=True),
    )
    stages: list[tuple[str, nn.Module]] = [("stem", stem)]
    channels = widths[0]
    for index, (width, stride) in enumerate(zip(widths[1:], (1, 2, 2), strict=True), start=1):
        layer = [BasicBlock(channels if b == 0 else width, width, stride if b == 0 else 1, info) for b in range(blocks)]
        stages.append((f"layer{index}", nn.Sequential(*layer)))
        channels = width
    model = StagedNet(stages, PooledLinearHead(channels, info.num_classes))
    init_weights(model)
    return model


_STANDARD = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4), projection shortcut where the shape changes (He et al. 2016, Fig. 5)."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, info: ModelInfo) -> None:
        super().__init__()
        out = width * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False),
            norm2d(width, info.batchnorm),
            nn.ReLU(inplace=True),
            conv3x3(width, width, stride, info.onthefly),
            norm2d(width, info.batchnorm),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, out, 1, bias=False),
            norm2d(out, info.batchnorm),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out, kernel_size=1, stride=stride, bias=False), norm2d(out, info.batchnorm)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def cifar_resnet50(info: ModelInfo) -> StagedNet:
    """RepDistiller's ResNet50 (models/resnetv2.py): ImageNet ResNet-50's bottleneck stages [3, 4, 6, 3] at
    widths 64-128-256-512 (x4 out), on a 3x3 stride-1 stem without max pool. Stages ``stem``, ``layer1..4``."""
    stem = nn.Sequential(
        conv3x3(info.in_channels, 64, onthefly=info.onthefly), norm2d(64, info.batchnorm), nn.ReLU(inplace=True)
    )
    stages: list[tuple[str, nn.Module]] = [("stem", stem)]
    channels = 64
    for index, (width, blocks, stride) in enumerate(
        zip((64, 128, 256, 512), (3, 4, 6, 3), (1, 2, 2, 2), strict=True), start=1
    ):
        layer = []
        for block in range(blocks):
            layer.append(Bottleneck(channels, width, stride if block == 0 else 1, info))
            channels = width * Bottleneck.expansion
        stages.append((f"layer{index}", nn.Sequential(*layer)))
    model = StagedNet(stages, PooledLinearHead(channels, info.num_classes))
    init_weights(model)
    return model


SOURCE = "He et al. 2016 (CIFAR ResNet, section 4.2); widths as in RepDistiller models/resnet.py"
for _depth in (8, 14, 20, 26, 32, 44, 56, 110):
    MODELS.add(f"resnet{_depth}", ModelSpec(lambda info, d=_depth: cifar_resnet(d, _STANDARD, info), SOURCE))
for _depth in (8, 32):
    MODELS.add(f"resnet{_depth}x4", ModelSpec(lambda info, d=_depth: cifar_resnet(d, _X4, info), SOURCE))
MODELS.add("resnet50", ModelSpec(cifar_resnet50, "RepDistiller models/resnetv2.py ResNet50 (Tian et al. 2020)"))
