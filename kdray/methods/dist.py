"""DIST (Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022).

Matches relations instead of probabilities, so a student need not reproduce a much stronger teacher's
exact outputs: ``L = w_ce·CE(s(x), y) + β·τ²·(1 − mean_i ρ(p_s,i·, p_t,i·)) + γ·τ²·(1 − mean_c
ρ(p_s,·c, p_t,·c))`` with ``p = softmax(z/τ)`` and ρ the Pearson correlation: per sample across classes
(inter-class relation) and per class across the batch (intra-class relation). Defaults: the authors'
CIFAR-100 setting (β = γ = 2, τ = 4, CE weight 1); on ImageNet they use β = γ = 1, τ = 1. Under data
parallelism the intra-class term is computed over each worker's part of the batch.
``logit_standardization`` z-scores both logit vectors first (Sun et al., CVPR 2024).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from kdray.data import Batch
from kdray.methods.base import METHODS, Method, MethodParams, StepInfo
from kdray.methods.losses import comparable, relation_losses


class DISTParams(MethodParams):
    name: Literal["dist"] = "dist"
    temperature: float = Field(4.0, gt=0, le=100, description="Softmax temperature τ.")
    beta: float = Field(2.0, ge=0, description="Weight of the inter-class relation (per sample, across classes).")
    gamma: float = Field(2.0, ge=0, description="Weight of the intra-class relation (per class, across the batch).")
    ce_weight: float = Field(1.0, ge=0, description="Weight of the cross-entropy on the labels.")
    logit_standardization: bool = Field(False, description="z-score student and teacher logits first (LS).")


@METHODS.register("dist")
class DIST(Method):
    """DIST from one frozen teacher (the first guide)."""

    Params = DISTParams
    listed = 3
    summary = "Huang et al. 2022: CE + beta*inter-class + gamma*intra-class Pearson relation of soft outputs"

    def forward(self, batch: Batch, step: StepInfo) -> dict[str, torch.Tensor]:
        params: DISTParams = self.params  # type: ignore[assignment]
        student_logits = self.student(batch.images)
        teacher_logits = self.guide(0)(batch)
        compared = comparable(student_logits, teacher_logits, params.logit_standardization)
        inter, intra = relation_losses(*compared, params.temperature)
        return {
            "ce": params.ce_weight * F.cross_entropy(student_logits, batch.labels),
            "inter": params.beta * inter,
            "intra": params.gamma * intra,
        }
