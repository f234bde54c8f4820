"""Vanilla knowledge distillation (Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015).

``L = (1 − α)·CE(s(x), y) + α·T²·KL(softmax(t(x)/T) ‖ softmax(s(x)/T))``. Defaults follow
RepDistiller's CIFAR-100 recipe: T = 4, CE weight 0.1, KD weight 0.9. ``ce_weight`` and ``kd_weight``,
when set, replace (1 − α) and α: recipes whose weights do not sum to 1, such as the logit-standardisation
authors' KD+LS (CE 0.1, KD 9, T = 2). ``logit_standardization`` z-scores student and teacher logits
before the temperature softmax (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR
2024); the cross-entropy keeps the raw logits.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from kdray.data import Batch
from kdray.methods.base import METHODS, Method, MethodParams, StepInfo
from kdray.methods.losses import KLReduction, comparable, soft_kl


class KDParams(MethodParams):
    name: Literal["kd"] = "kd"
    temperature: float = Field(4.0, gt=0, le=100, description="Softmax temperature T of the soft targets.")
    alpha: float = Field(0.9, ge=0, le=1, description="Weight of the KD term; (1 - alpha) weighs the CE term.")
    ce_weight: float | None = Field(None, ge=0, description="Weight of the CE term (null: 1 - alpha).")
    kd_weight: float | None = Field(None, ge=0, description="Weight of the KD term (null: alpha); LS's recipe: 9.")
    logit_standardization: bool = Field(False, description="z-score student and teacher logits first (LS).")
    kl_reduction: KLReduction = Field(
        "batchmean", description="batchmean (the formula) or mean (/ classes: TAKD's code, nn.KLDivLoss())."
    )
    added_later: ClassVar[dict[str, Any]] = {"ce_weight": None, "kd_weight": None}

    def weights(self) -> tuple[float, float]:
        """The CE and KD terms' weights."""
        ce = 1 - self.alpha if self.ce_weight is None else self.ce_weight
        return ce, self.alpha if self.kd_weight is None else self.kd_weight


@METHODS.register("kd")
class KD(Method):
    """Hinton KD from one frozen teacher (the first guide)."""

    Params = KDParams
    listed = 1
    summary = "Hinton et al. 2015: (1-alpha)*CE + alpha*T^2*KL(teacher || student)"

    def forward(self, batch: Batch, step: StepInfo) -> dict[str, torch.Tensor]:
        params: KDParams = self.params  # type: ignore[assignment]
        student_logits = self.student(batch.images)
        teacher_logits = self.guide(0)(batch)
        compared = comparable(student_logits, teacher_logits, params.logit_standardization)
        ce_weight, kd_weight = params.weights()
        return {
            "ce": ce_weight * F.cross_entropy(student_logits, batch.labels),
            "kd": kd_weight * soft_kl(*compared, params.temperature, params.kl_reduction),
        }
