"""What kdray gives back: a classifier anyone can call, with the input normalisation inside.

kdray trains on images standardised with the training split's own per-channel statistics; a model
that expects them is a trap outside kdray (the same student scores 0.99 on standardised and 0.15 on
plain pixels). ``Classifier`` takes what every image pipeline produces — float images in [0, 1], NCHW,
at the training resolution — and returns logits. It is what MLflow holds, what ``kdray export``
writes and what ``kdray evaluate`` measures.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Classifier(nn.Module):
    """``model((images - mean) / std)``; ``classes`` names the logits' columns, ``image_shape`` is the (C, H, W)
    it was trained at."""

    def __init__(
        self,
        model: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        classes: Sequence[str] = (),
        image_shape: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.image_shape = image_shape
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))
        self.classes = list(classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std)


def restandardized(
    model: nn.Module, data: tuple[Sequence[float], Sequence[float]], own: tuple[Sequence[float], Sequence[float]]
) -> nn.Module:
    """``model`` fed inputs standardised with ``data``: as it is when it expects those very statistics, else
    behind a ``Restandardize`` to its ``own``."""
    if [list(v) for v in own] == [list(v) for v in data]:
        return model
    return Restandardize(model, data, own)


class Restandardize(nn.Module):
    """Feeds a model that expects other statistics (a given teacher) from inputs standardised with the data's:
    ``x' = (x·std_data + mean_data - mean_model) / std_model``, one per-channel affine map."""

    def __init__(
        self,
        model: nn.Module,
        data: tuple[Sequence[float], Sequence[float]],
        own: tuple[Sequence[float], Sequence[float]],
    ) -> None:
        super().__init__()
        self.model = model
        data_mean, data_std = (torch.tensor(list(v), dtype=torch.float32).view(1, -1, 1, 1) for v in data)
        own_mean, own_std = (torch.tensor(list(v), dtype=torch.float32).view(1, -1, 1, 1) for v in own)
        self.register_buffer("scale", data_std / own_std)
        self.register_buffer("shift", (data_mean - own_mean) / own_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * self.scale + self.shift)
