"""What the feature and relation baselines share: a teacher whose intermediate features the student is taught
from, and the loss ``L = w_ce·CE(s(x), y) + β·L_feat`` of RepDistiller's runs of them (``-r 1 -a 0 -b β``: no
logit KD term), each method its own ``L_feat`` (``feature_terms``).

RepDistiller reads a CIFAR ResNet's features as ``[stem, layer1, layer2, layer3, pooled]``; kdray's stages are
``stem, layer1, layer2, layer3`` and the embedding (the classifier's input) is the pooled vector, so "every
block group" is every stage but the first, and "the last block group" is the last stage. Two architectures
with different numbers of stages are paired from their last stage backwards (``paired_stages``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdray.data import Batch
from kdray.methods.base import Method, MethodParams, StepInfo
from kdray.models import ModelInfo
from kdray.models.features import forward_features


class FeatureParams(MethodParams):
    ce_weight: float = Field(1.0, ge=0, le=100, description="Weight of the cross-entropy on the labels.")


class FeaturePass:
    """One network's logits, stage outputs (in order) and embedding for a batch."""

    def __init__(self, logits: torch.Tensor, stages: dict[str, torch.Tensor], embedding: torch.Tensor) -> None:
        self.logits, self.stages, self.embedding = logits, stages, embedding

    def last(self, count: int) -> list[torch.Tensor]:
        """The outputs of the last ``count`` stages, in order."""
        return list(self.stages.values())[len(self.stages) - count :]


def paired_stages(student: int, teacher: int, skip_first: bool = True) -> int:
    """How many stages a student of ``student`` and a teacher of ``teacher`` stages pair, from the last one back:
    every stage but the first (the stem) of the shallower network."""
    return max(1, min(student, teacher) - (1 if skip_first else 0))


class FeatureMethod(Method):
    """A feature baseline: the teacher's features of the same images, the student's, and ``feature_terms``."""

    student_stages = 1
    guide_stages = 1

    def passes(self, batch: Batch) -> tuple[FeaturePass, FeaturePass]:
        """The student's pass (with gradients) and the teacher's (without) on the batch's images."""
        student = FeaturePass(*forward_features(self.student, batch.images))
        teacher = FeaturePass(*self.guide(0).features(batch.images))
        return student, teacher

    def probe(self, info: ModelInfo) -> tuple[FeaturePass, FeaturePass]:
        """The student's and the teacher's features of a two-image probe batch of ``info``'s shape, in eval mode
        and without gradients: what a connector is sized from."""
        probe = torch.zeros(2, info.in_channels, info.image_size, info.image_size)
        was_training = self.student.training
        with torch.no_grad():
            student = FeaturePass(*forward_features(self.student.eval(), probe))
            teacher = FeaturePass(*self.guide(0).features(probe.to(device_of(self.guide(0)))))
        self.student.train(was_training)
        return student, teacher

    def feature_terms(self, student: FeaturePass, teacher: FeaturePass) -> dict[str, torch.Tensor]:
        """The method's loss terms, each already weighted (β), by name."""
        raise NotImplementedError

    def forward(self, batch: Batch, step: StepInfo) -> dict[str, torch.Tensor]:
        student, teacher = self.passes(batch)
        ce = F.cross_entropy(student.logits, batch.labels)
        return {"ce": self.params.ce_weight * ce, **self.feature_terms(student, teacher)}  # type: ignore[attr-defined]


def device_of(module: nn.Module) -> torch.device:
    """Where a module's parameters are."""
    return next(module.parameters()).device
