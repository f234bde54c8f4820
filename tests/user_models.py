"""Models as a user's own package would define them: named in configs as ``user_models:<callable>``."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """A plain CNN with its own forward (not body-then-head): kdray keeps it whole, without stages."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.bn(self.conv(x)))
        return self.fc(features.amax(dim=(2, 3)))  # global max pooling: a forward of its own


def features_net(num_classes: int, in_channels: int) -> nn.Module:
    """A ``features`` + ``avgpool`` + ``classifier`` model, which kdray splits into stages by resolution."""

    class FeaturesNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(in_channels, 16, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1),
                nn.ReLU(),
            )
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Linear(32, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    return FeaturesNet()


def pooled_net(num_classes: int, in_channels: int) -> nn.Module:
    """Pools any image to 8x8 first: training costs next to nothing at any resolution (for memory tests)."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(8), nn.Flatten(), nn.Linear(in_channels * 64, num_classes))
