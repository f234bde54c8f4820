"""FitNets (Romero, Ballas, Kahou, Chassang, Gatta, Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015;
RepDistiller's ``distiller_zoo/FitNet.py`` and ``models/util.py:ConvReg``).

``L = w_ce·CE + β·mean((r(F_s) − F_t)²)``: the student's features at the hint stage, through a regressor ``r``
(1x1 convolution, BatchNorm, ReLU) that trains with the student and is not part of it, match the teacher's at
the same stage counted from the last. RepDistiller: ``hint_layer`` 2 of a CIFAR ResNet (``layer2``, the second
stage from the last here), β = 100 (``-b 100``), w_ce = 1, one stage of training (no separate hint stage).

Deliberate difference: RepDistiller's ConvReg changes the spatial size with a strided or transposed
convolution, only for sizes in a 2:1 ratio; here a student map of another size is average-pooled (larger) or
bilinearly resized (smaller) to the teacher's before the 1x1 convolution, so any pair of architectures works.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdray.methods.base import METHODS
from kdray.methods.feature_base import FeatureMethod, FeatureParams, FeaturePass
from kdray.models import ModelInfo


class FitNetParams(FeatureParams):
    name: Literal["fitnet"] = "fitnet"
    beta: float = Field(100.0, ge=0, le=1e5, description="Weight β of the hint term (RepDistiller: 100).")
    hint_stage: int = Field(
        -2,
        ge=-16,
        le=-1,
        description="The hinted stage, counted from the last (-1) in both networks (RepDistiller: -2).",
    )


class Regressor(nn.Module):
    """The student's hint-stage map at the teacher's size and channel count."""

    def __init__(self, student_channels: int, teacher_channels: int, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = size
        self.conv = nn.Sequential(
            nn.Conv2d(student_channels, teacher_channels, 1, bias=False),
            nn.BatchNorm2d(teacher_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if tuple(features.shape[-2:]) != self.size:
            larger = features.shape[-2] * features.shape[-1] > self.size[0] * self.size[1]
            features = (
                F.adaptive_avg_pool2d(features, self.size)
                if larger
                else F.interpolate(features, size=self.size, mode="bilinear", align_corners=False)
            )
        return self.conv(features)


@METHODS.register("fitnet")
class FitNet(FeatureMethod):
    """Hint the teacher's features at one stage through a trained regressor."""

    Params = FitNetParams
    listed = 19
    summary = "Romero et al. 2015: MSE between the teacher's hint-stage features and the student's, regressed"

    def connect(self, info: ModelInfo, train_labels: torch.Tensor) -> None:
        """The regressor, sized from one probe batch through the student and the teacher."""
        params: FitNetParams = self.params  # type: ignore[assignment]
        student, teacher = self.probe(info)
        depth = -params.hint_stage
        if depth > min(len(student.stages), len(teacher.stages)):
            raise ValueError(
                f"method.hint_stage={params.hint_stage}: the student has {len(student.stages)} stages and the "
                f"teacher {len(teacher.stages)}; choose -1 to -{min(len(student.stages), len(teacher.stages))}"
            )
        s, t = student.last(depth)[0], teacher.last(depth)[0]
        self.regressor = Regressor(s.shape[1], t.shape[1], (t.shape[-2], t.shape[-1]))

    def feature_terms(self, student: FeaturePass, teacher: FeaturePass) -> dict[str, torch.Tensor]:
        params: FitNetParams = self.params  # type: ignore[assignment]
        depth = -params.hint_stage
        hinted = self.regressor(student.last(depth)[0])
        return {"hint": params.beta * F.mse_loss(hinted.float(), teacher.last(depth)[0].float())}
