"""Training without distillation: cross-entropy on the labels (the baseline and how teachers are trained)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from kdray.methods.base import METHODS, Method, MethodParams, StepInfo


class StudentOnlyParams(MethodParams):
    name: Literal["none"] = "none"


@METHODS.register("none")
class StudentOnly(Method):
    """``L = CE(s(x), y)``."""

    Params = StudentOnlyParams
    kind = "alone"
    summary = "no distillation: cross-entropy on the labels (baseline; trains teachers)"

    def forward(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo) -> dict[str, torch.Tensor]:
        return {"ce": F.cross_entropy(self.student(images), labels)}
