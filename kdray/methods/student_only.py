"""Training without distillation: cross-entropy on the labels (the baseline and how teachers are trained)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from kdray.data import Batch
from kdray.methods.base import METHODS, Method, MethodParams, Planner, StepInfo


class StudentOnlyParams(MethodParams):
    name: Literal["none"] = "none"


@METHODS.register("none")
class StudentOnly(Method):
    """``L = CE(s(x), y)``."""

    Params = StudentOnlyParams
    listed = 0
    summary = "no distillation: cross-entropy on the labels (baseline; trains teachers)"

    @classmethod
    def plan_guides(cls, params: MethodParams, planner: Planner) -> list[str]:
        return []

    def forward(self, batch: Batch, step: StepInfo) -> dict[str, torch.Tensor]:
        return {"ce": F.cross_entropy(self.student(batch.images), batch.labels)}
