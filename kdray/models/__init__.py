"""CIFAR-style classifiers; importing this package registers every family below."""

from kdray.models import plane, resnet, wrn  # noqa: F401  (registration)
from kdray.models.registry import MODELS, ModelInfo, build_model, parameter_count
from kdray.models.staged import StagedNet

__all__ = ["MODELS", "ModelInfo", "StagedNet", "build_model", "parameter_count"]
