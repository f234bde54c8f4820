"""The model registry: every architecture is a function ``ModelInfo -> StagedNet``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kdray.models.staged import StagedNet
from kdray.registry import Registry


@dataclass(frozen=True)
class ModelInfo:
    """What an architecture needs to know: the data it will see, and its filter shape."""

    num_classes: int
    in_channels: int = 3
    image_size: int = 32
    onthefly: bool = False  # every 3x3 convolution becomes 1x3 (Pacemaker KD's student)
    batchnorm: bool = True  # False: no normalisation layers at all


MODELS: Registry[Callable[[ModelInfo], StagedNet]] = Registry("model")


def build_model(name: str, info: ModelInfo) -> StagedNet:
    """Build a freshly initialised ``name`` for ``info`` (call ``torch.manual_seed`` first to fix it)."""
    if info.image_size < 8:
        raise ValueError(f"images must be at least 8x8, got {info.image_size}x{info.image_size}")
    return MODELS[name](info)


def parameter_count(model: StagedNet) -> int:
    return sum(p.numel() for p in model.parameters())
