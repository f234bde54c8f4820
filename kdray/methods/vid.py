"""Variational information distillation, VID (Ahn, Hu, Damianou, Lawrence, Dai, "Variational Information
Distillation for Knowledge Transfer", CVPR 2019; RepDistiller's ``distiller_zoo/VID.py``, code from the authors).

``L = w_ce·CE + β·Σ_j mean(½((μ_j(F_s^j) − F_t^j)²/σ_j² + log σ_j²))`` over every block group j (every stage but
the stem): a regressor μ_j (1x1 conv, ReLU, 1x1 conv, ReLU, 1x1 conv; its middle width the teacher's channel
count) maps the student's map to the teacher's channels, and ``σ_j² = softplus(a_j) + 10⁻⁵`` is a variance per
teacher channel, learned with it, starting at 5. The larger of two maps is average-pooled to the smaller.
RepDistiller: β = 1 (``-b 1``), w_ce = 1.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from kdray.methods.base import METHODS
from kdray.methods.feature_base import FeatureMethod, FeatureParams, FeaturePass, paired_stages
from kdray.methods.feature_losses import same_size, vid_loss
from kdray.models import ModelInfo


class VIDParams(FeatureParams):
    name: Literal["vid"] = "vid"
    beta: float = Field(1.0, ge=0, le=1e4, description="Weight β of the VID term (RepDistiller: 1).")
    initial_variance: float = Field(
        5.0, gt=1e-4, le=100, description="The learned variances' starting value (the authors: 5)."
    )


class VariationalRegressor(nn.Module):
    """μ(F_s) with the teacher's channel count, and the per-channel variance's pre-softplus parameter."""

    def __init__(self, student_channels: int, teacher_channels: int, initial_variance: float, eps: float) -> None:
        super().__init__()
        self.mean = nn.Sequential(
            nn.Conv2d(student_channels, teacher_channels, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(teacher_channels, teacher_channels, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(teacher_channels, teacher_channels, 1, bias=False),
        )
        start = math.log(math.expm1(initial_variance - eps))  # softplus(start) + eps == initial_variance
        self.log_scale = nn.Parameter(torch.full((teacher_channels,), start))


@METHODS.register("vid")
class VariationalInformation(FeatureMethod):
    """Maximise a variational bound on the mutual information between each block group's features."""

    Params = VIDParams
    listed = 24
    summary = "Ahn et al. 2019: Gaussian likelihood of the teacher's maps given the student's, learned variances"
    eps = 1e-5

    def connect(self, info: ModelInfo, train_labels: torch.Tensor) -> None:
        """One regressor per paired block group, sized from a probe batch."""
        params: VIDParams = self.params  # type: ignore[assignment]
        student, teacher = self.probe(info)
        count = paired_stages(len(student.stages), len(teacher.stages))
        self.regressors = nn.ModuleList(
            VariationalRegressor(s.shape[1], t.shape[1], params.initial_variance, self.eps)
            for s, t in zip(student.last(count), teacher.last(count), strict=True)
        )

    def feature_terms(self, student: FeaturePass, teacher: FeaturePass) -> dict[str, torch.Tensor]:
        count = len(self.regressors)
        total = torch.zeros((), device=student.logits.device)
        for regressor, s, t in zip(self.regressors, student.last(count), teacher.last(count), strict=True):
            s, t = same_size(s, t)
            total = total + vid_loss(regressor.mean(s), t, regressor.log_scale, self.eps)
        return {"vid": self.params.beta * total}  # type: ignore[attr-defined]
