"""VGG with BatchNorm for CIFAR, as in RepDistiller (Tian et al., "Contrastive Representation
Distillation", ICLR 2020; models/vgg.py): five conv blocks, the 4096-wide FC layers removed, global
average pooling and one linear layer. vgg8 is its configuration "S" (one conv per block); vgg11/13/16/19
are Simonyan & Zisserman's configurations A/B/D/E. Convolutions carry a bias, as there.

Stages ``block0..4``: a 2x2 max pool before blocks 1-3 (and before block 4 from 64x64 up, where
RepDistiller pools only at exactly 64x64), then the block's conv-BN-ReLU layers. Pools use
``ceil_mode`` so 8x8 digits still end at 1x1 (the sizes of even inputs are unchanged).
"""

from __future__ import annotations

from torch import nn

from kdray.models.registry import MODELS, ModelInfo, ModelSpec
from kdray.models.staged import PooledLinearHead, StagedNet, conv3x3, norm2d

VGG_BOOK: dict[int, list[list[int]]] = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def vgg(depth: int, info: ModelInfo) -> StagedNet:
    stages: list[tuple[str, nn.Module]] = []
    channels = info.in_channels
    for index, widths in enumerate(VGG_BOOK[depth]):
        pooled = index in (1, 2, 3) or (index == 4 and info.image_size >= 64)
        layers: list[nn.Module] = [nn.MaxPool2d(2, ceil_mode=True)] if pooled else []
        for width in widths:
            layers += [
                conv3x3(channels, width, onthefly=info.onthefly, bias=True),
                norm2d(width, info.batchnorm),
                nn.ReLU(inplace=True),
            ]
            channels = width
        stages.append((f"block{index}", nn.Sequential(*layers)))
    model = StagedNet(stages, PooledLinearHead(channels, info.num_classes))
    init_vgg(model)
    return model


def init_vgg(model: nn.Module) -> None:
    """RepDistiller's initialisation: N(0, 2/(k²·out)) convolutions, unit BN, N(0, 0.01) linear, zero biases."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)


SOURCE = "RepDistiller models/vgg.py (Tian et al. 2020), Simonyan & Zisserman 2015 configurations"
for _depth in VGG_BOOK:
    MODELS.add(f"vgg{_depth}", ModelSpec(lambda info, d=_depth: vgg(d, info), SOURCE))
