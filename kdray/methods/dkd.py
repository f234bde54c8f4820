"""Decoupled knowledge distillation (Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022).

KD's KL splits into a target-class term and a non-target term, which DKD weighs apart:
``L = w_ce·CE(s(x), y) + min(e / E_warm, 1)·(α·TCKD + β·NCKD)``, with
``TCKD = T²·KL(b_t ‖ b_s)`` over the binary distributions ``b = [p_y, 1 − p_y]`` and
``NCKD = T²·KL(p̂_t ‖ p̂_s)`` over the distributions ``p̂`` of the non-target classes alone
(``p = softmax(z/T)``), ``e`` the epoch counted from 1. Defaults: the authors' CIFAR-100 recipe for
resnet32x4 → resnet8x4 (mdistiller's configs/cifar100/dkd: α = 1, β = 8, T = 4, 20 warm-up epochs,
CE weight 1); β is the knob the paper tunes per pair. ``logit_standardization`` z-scores both logit
vectors first (Sun et al., CVPR 2024).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from kdray.data import Batch
from kdray.methods.base import METHODS, Method, MethodParams, StepInfo
from kdray.methods.losses import comparable, decoupled_kl
from kdray.schema import EPOCHS_MAX


class DKDParams(MethodParams):
    name: Literal["dkd"] = "dkd"
    temperature: float = Field(4.0, gt=0, le=100, description="Softmax temperature T.")
    alpha: float = Field(1.0, ge=0, description="Weight of TCKD, the target-class term.")
    beta: float = Field(8.0, ge=0, description="Weight of NCKD, the non-target term (the paper tunes it per pair).")
    ce_weight: float = Field(1.0, ge=0, description="Weight of the cross-entropy on the labels.")
    warmup_epochs: int = Field(
        20, ge=0, le=EPOCHS_MAX, description="Epochs over which the DKD term ramps up linearly (0: none)."
    )
    logit_standardization: bool = Field(False, description="z-score student and teacher logits first (LS).")


@METHODS.register("dkd")
class DKD(Method):
    """DKD from one frozen teacher (the first guide)."""

    Params = DKDParams
    listed = 2
    summary = "Zhao et al. 2022: CE + warm-up * (alpha*TCKD + beta*NCKD), KD's KL decoupled"

    def forward(self, batch: Batch, step: StepInfo) -> dict[str, torch.Tensor]:
        params: DKDParams = self.params  # type: ignore[assignment]
        student_logits = self.student(batch.images)
        teacher_logits = self.guide(0)(batch)
        compared = comparable(student_logits, teacher_logits, params.logit_standardization)
        tckd, nckd = decoupled_kl(*compared, batch.labels, params.temperature)
        ramp = min((step.epoch + 1) / params.warmup_epochs, 1.0) if params.warmup_epochs else 1.0
        return {
            "ce": params.ce_weight * F.cross_entropy(student_logits, batch.labels),
            "tckd": ramp * params.alpha * tckd,
            "nckd": ramp * params.beta * nckd,
        }
