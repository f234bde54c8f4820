"""Classifiers: kdray's CIFAR families (importing this package registers them) and, by name, torchvision's,
timm's and a user's own (``kdray.models.registry``)."""

# isort: off
from kdray.models import plane, resnet, wrn, vgg, mobilenetv2, shufflenet  # noqa: F401  (registration, listing order)
from kdray.models import families  # noqa: F401  (reads sized names: resnet20_w0.5)

# isort: on
from kdray.models.registry import (
    MODELS,
    ModelInfo,
    ModelSpec,
    build_model,
    code_version,
    model_spec,
    parameter_count,
    require_model,
)
from kdray.models.staged import StagedNet
from kdray.models.weights import WeightsError, load_weights

__all__ = [
    "MODELS",
    "ModelInfo",
    "ModelSpec",
    "StagedNet",
    "WeightsError",
    "build_model",
    "code_version",
    "load_weights",
    "model_spec",
    "parameter_count",
    "require_model",
]
