"""Plain CNNs plane2..plane10 of TAKD (Mirzadeh et al., AAAI 2020), also used by DGKD (Son et al., 2021).

Layer books as in the authors' CIFAR-10 code: "ConvK" is conv3x3(K)-BN-ReLU, "MaxPool" a 2x2 max pool
that closes a stage, "FCK" a linear layer (ReLU between linear layers). Pools use ``ceil_mode`` so a
1x1 map stays 1x1: that lets every network run on inputs as small as 8x8 (digits), where the paper's
32x32 sizes are unchanged.
"""

from __future__ import annotations

import math

from torch import nn

from kdray.models.registry import MODELS, ModelInfo, ModelSpec
from kdray.models.staged import StagedNet, conv3x3, init_weights, norm2d

PLANE_BOOK: dict[int, tuple[list[list[int]], list[int]]] = {
    # depth: (conv widths per stage, hidden linear widths)
    2: ([[16], [16]], []),
    4: ([[16, 16], [32, 32]], []),
    6: ([[16, 16], [32, 32], [64, 64]], []),
    8: ([[16, 16], [32, 32], [64, 64], [128, 128]], [64]),
    10: ([[32, 32], [64, 64], [128, 128], [256, 256, 256, 256]], [128]),
}


def plane_cnn(depth: int, info: ModelInfo) -> StagedNet:
    """Stages ``block1..k`` (convs then a max pool); head flattens and applies the linear layers."""
    conv_stages, hidden = PLANE_BOOK[depth]
    stages: list[tuple[str, nn.Module]] = []
    channels = info.in_channels
    for index, widths in enumerate(conv_stages, start=1):
        layers: list[nn.Module] = []
        for width in widths:
            layers += [
                conv3x3(channels, width, onthefly=info.onthefly),
                norm2d(width, info.batchnorm),
                nn.ReLU(inplace=True),
            ]
            channels = width
        layers.append(nn.MaxPool2d(2, ceil_mode=True))
        stages.append((f"block{index}", nn.Sequential(*layers)))
    size = info.image_size
    for _ in conv_stages:
        size = math.ceil(size / 2)
    flat = channels * size * size
    head_layers: list[nn.Module] = [nn.Flatten()]
    for width in hidden:
        head_layers += [nn.Linear(flat, width), nn.ReLU(inplace=True)]
        flat = width
    head_layers.append(nn.Linear(flat, info.num_classes))
    model = StagedNet(stages, nn.Sequential(*head_layers))
    init_weights(model)
    return model


for _depth in PLANE_BOOK:
    MODELS.add(
        f"plane{_depth}",
        ModelSpec(
            lambda info, d=_depth: plane_cnn(d, info), "TAKD (Mirzadeh et al. 2020) plain CNNs, authors' CIFAR-10 code"
        ),
    )
