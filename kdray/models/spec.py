"""What an architecture is told (``ModelInfo``) and what the registry holds for it (``ModelSpec``).

Apart from the registry so that kdray's own families and the wrappers of foreign models
(``kdray.models.foreign``) can both describe themselves without importing the registry's lookup.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from kdray.models.staged import StagedNet


@dataclass(frozen=True)
class ModelInfo:
    """What an architecture needs to know: the data it will see, and its filter shape."""

    num_classes: int
    in_channels: int = 3
    image_size: int = 32
    onthefly: bool = False  # every 3x3 convolution becomes 1x3 (Pacemaker KD's student)
    batchnorm: bool = True  # False: no normalisation layers at all


@dataclass(frozen=True)
class ModelSpec:
    """A buildable architecture: how to build it, where it comes from, and which of kdray's switches it honours.

    ``onthefly``: it builds 1x3 filters when asked (Pacemaker's student); ``native``: it is kdray's own code,
    so ``batchnorm: false`` removes its normalisation layers. ``code``: the modules whose source decides
    the weights it trains (default: the module that defines ``build``, plus the stage wrapper).
    """

    build: Callable[[ModelInfo], StagedNet]
    source: str
    onthefly: bool = True
    native: bool = True
    code: tuple[str, ...] = field(default=())
    version_tag: str = ""  # a library's version (torchvision, timm), instead of or beside hashed code
