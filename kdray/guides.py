"""Frozen guides (teachers, assistants, pacemakers) as methods see them: a module that answers logits.

A method asks ``guide(batch)`` for the logits of the batch's own images and ``guide(tensor)`` for
anything it made from them (mixup, feature mixing). Only a ``Batch`` carries its views (which crop
and flip of which training image each row is), so only the first can be answered by the
guide-output cache: the cache's key travels with the batch, and a mixed input, being a plain
tensor, always runs the model. A method cannot pass the wrong key because it never handles one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kdray.data import Batch
from kdray.guide_cache import GuideLookup
from kdray.models import StagedNet
from kdray.models.deploy import Restandardize
from kdray.models.features import forward_features


class Guide(nn.Module):
    """A frozen model in eval mode, optionally in front of its cached outputs."""

    def __init__(self, model: nn.Module, lookup: GuideLookup | None = None) -> None:
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.lookup = lookup
        self.forward_images = 0  # images the model ran on since the last ``guide_metrics``

    def train(self, mode: bool = True) -> Guide:
        """Always eval: a guide's BatchNorm statistics are frozen."""
        return super().train(False)

    def forward(self, inputs: Batch | torch.Tensor) -> torch.Tensor:
        if isinstance(inputs, Batch):
            if self.lookup is not None and inputs.views is not None:
                return self.lookup.logits(inputs.images, inputs.views, self.run)
            inputs = inputs.images
        return self.run(inputs)

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Logits, stage outputs and embedding of ``images`` (``kdray.models.features.forward_features``),
        without gradients and never from the cache (it holds logits only). Plain tensors, not inference
        tensors: feature losses multiply them with the student's, and autograd may keep them."""
        model = self.model
        if isinstance(model, Restandardize):  # a given teacher that expects other input statistics
            images, model = images * model.scale + model.shift, model.model
        if not isinstance(model, StagedNet) or not model.stage_names:
            raise ValueError(f"a feature method needs a guide with stages; {type(model).__name__} has none")
        self.forward_images += len(images)
        with torch.no_grad():
            return forward_features(model, images)

    def run(self, images: torch.Tensor) -> torch.Tensor:
        """The model's logits, without autograd."""
        self.forward_images += len(images)
        with torch.inference_mode():
            return self.model(images)


def as_guides(models: Sequence[nn.Module]) -> list[Guide]:
    """Guides as given, or bare models wrapped without a cache (tests, tools)."""
    return [model if isinstance(model, Guide) else Guide(model) for model in models]


def guide_metrics(guides: Sequence[Guide]) -> dict[str, float]:
    """The guides' work in the epoch (read and reset): images run, and the cache's hits, misses and bytes."""
    if not guides:
        return {}
    metrics = {"guide/forward_images": float(sum(guide.forward_images for guide in guides))}
    cache: dict[str, float] = {}
    for guide in guides:
        guide.forward_images = 0
        if guide.lookup is not None:
            guide.lookup.flush()
            for name, value in guide.lookup.epoch_metrics().items():
                cache[name] = cache.get(name, 0.0) + value
    if cache:
        looked_up = cache["cache/hits"] + cache["cache/misses"]
        cache["cache/hit_rate"] = cache["cache/hits"] / looked_up if looked_up else 0.0
    return {**metrics, **cache}
