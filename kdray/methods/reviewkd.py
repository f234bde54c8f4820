"""Knowledge review, ReviewKD (Chen, Liu, Zhao, Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021;
the authors' dvlab-research/ReviewKD and mdistiller's ``distillers/ReviewKD.py``, whose CIFAR-100 runs it follows).

The student's features of every block group and its embedding (as a 1x1 map) are fused from the deepest to the
shallowest by attention-based fusion (ABF): each level's map, through a 1x1 conv + BN to ``mid`` channels, is
mixed with the fused map of the level below (nearest-upsampled to its size) by two sigmoid attention maps of a
1x1 conv over both, resized to the teacher's map of that level and taken to the teacher's channel count by a
3x3 conv + BN. Each level's result is compared with the teacher's by the hierarchical context loss (HCL, the
MSE at full size and at 4x4, 2x2, 1x1 poolings):

``L = w_ce·CE + β·min((e + 1)/w, 1)·Σ_j HCL(ABF_j, F_t^j)``, e the epoch from 0, w the warm-up epochs.

mdistiller: β = 1 (``REVIEWKD_WEIGHT``), w = 20 epochs, w_ce = 1, ``mid = min(512, student embedding width)``.
Deliberate difference: the authors compare with the teacher's block outputs before their last ReLU
(``preact_feats``); kdray's stages end after it, so the teacher's maps here are the post-ReLU ones (its negative
part, which the ReLU drops, is not taught).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdray.data import Batch
from kdray.methods.base import METHODS, StepInfo
from kdray.methods.feature_base import FeatureMethod, FeatureParams, FeaturePass, paired_stages
from kdray.methods.feature_losses import hierarchical_context_loss
from kdray.models import ModelInfo


class ReviewParams(FeatureParams):
    name: Literal["reviewkd"] = "reviewkd"
    beta: float = Field(1.0, ge=0, le=1e3, description="Weight β of the HCL term (mdistiller: 1).")
    warmup_epochs: int = Field(
        20, ge=0, le=1000, description="Epochs over which β ramps up linearly from β/w (mdistiller: 20; 0: none)."
    )
    max_mid_channels: int = Field(512, ge=1, le=4096, description="Upper bound of the fused width (mdistiller: 512).")


class AttentionFusion(nn.Module):
    """ABF: one level's map fused with the level below's, then resized and projected to the teacher's map."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.project = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.attention = (
            nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        )  # the deepest level has nothing below it to fuse
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.project[0].weight, a=1)

    def forward(
        self, features: torch.Tensor, below: torch.Tensor | None, out_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The projected map at ``out_size`` and the fused map handed to the level above."""
        fused = self.reduce(features)
        if self.attention is not None and below is not None:
            below = F.interpolate(below, fused.shape[-2:], mode="nearest")
            weights = self.attention(torch.cat([fused, below], dim=1))
            fused = fused * weights[:, :1] + below * weights[:, 1:]
        if tuple(fused.shape[-2:]) != out_size:
            fused = F.interpolate(fused, out_size, mode="nearest")
        return self.project(fused), fused


@METHODS.register("reviewkd")
class KnowledgeReview(FeatureMethod):
    """Teach every level of the teacher from the fusion of the student's levels at and below it."""

    Params = ReviewParams
    listed = 26
    summary = "Chen et al. 2021: attention-fused student levels matched to the teacher's by hierarchical MSE"

    def connect(self, info: ModelInfo, train_labels: torch.Tensor) -> None:
        """One fusion module per level (every block group and the embedding), sized from a probe batch."""
        params: ReviewParams = self.params  # type: ignore[assignment]
        student, teacher = self.probe(info)
        self.paired = paired_stages(len(student.stages), len(teacher.stages))
        levels_s, levels_t = self.levels(student), self.levels(teacher)
        mid = min(params.max_mid_channels, student.embedding.shape[1])
        self.fusions = nn.ModuleList(
            AttentionFusion(s.shape[1], mid, t.shape[1], fuse=index < len(levels_s) - 1)
            for index, (s, t) in enumerate(zip(levels_s, levels_t, strict=True))
        )

    def levels(self, features: FeaturePass) -> list[torch.Tensor]:
        """Every paired block group's map, shallowest first, then the embedding as a 1x1 map."""
        return [*features.last(self.paired), features.embedding[:, :, None, None]]

    def forward(self, batch: Batch, step: StepInfo) -> dict[str, torch.Tensor]:
        terms = super().forward(batch, step)
        params: ReviewParams = self.params  # type: ignore[assignment]
        ramp = min((step.epoch + 1) / params.warmup_epochs, 1.0) if params.warmup_epochs else 1.0
        terms["review"] = ramp * terms["review"]
        return terms

    def feature_terms(self, student: FeaturePass, teacher: FeaturePass) -> dict[str, torch.Tensor]:
        levels_s, levels_t = self.levels(student), self.levels(teacher)
        total, below = torch.zeros((), device=student.logits.device), None
        for fusion, s, t in zip(reversed(self.fusions), reversed(levels_s), reversed(levels_t), strict=True):
            projected, below = fusion(s, below, (t.shape[-2], t.shape[-1]))
            total = total + hierarchical_context_loss(projected, t)
        return {"review": self.params.beta * total}  # type: ignore[attr-defined]
