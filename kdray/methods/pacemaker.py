"""Pacemaker KD (Son et al., "Pacemaker: Intermediate Teacher Knowledge Distillation for On-The-Fly
Convolutional Neural Network", arXiv 2003.03944, 2020).

The student uses 1xN "on-the-fly" filters (``student.onthefly: true``: every 3x3 convolution becomes
1x3); direct KD from an NxN teacher into it is reported unstable, sometimes below the student alone.
A pacemaker — by default the student's architecture with ordinary NxN filters — is first trained by
KD from the teacher (its own stage), then the student learns from the pacemaker and the teacher step
by step:

    w(p) = clip((p − start) / (end − start), 0, 1),  p = fraction of training done
    L = (1 − α)·CE + α·T²·[(1 − w(p))·KL(softmax(z_pace/T) ‖ softmax(z_s/T)) + w(p)·KL(softmax(z_t/T) ‖ softmax(z_s/T))]

The abstract says only that the student learns "from the pacemaker and the teacher step by step".
kdray's schedule starts fully on the pacemaker (whose outputs a 1xN student can follow) and shifts
linearly to the teacher between ``shift_start`` and ``shift_end`` (defaults 0 and 1: a linear
hand-over over the whole run), so the student only meets the teacher's harder targets once it has
learned the pacemaker's. A guide whose weight is 0 is not evaluated.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from kdray.data import Batch
from kdray.methods.base import METHODS, Method, MethodParams, Planner, StepInfo
from kdray.methods.kd import KDParams
from kdray.methods.losses import soft_kl
from kdray.models import MODELS
from kdray.schema import ModelConfig


class PacemakerParams(MethodParams):
    name: Literal["pacemaker"] = "pacemaker"
    temperature: float = Field(4.0, gt=0, le=100, description="Softmax temperature T (also of the pacemaker's KD).")
    alpha: float = Field(0.9, ge=0, le=1, description="Weight of the KD terms; (1 - alpha) weighs CE.")
    pacemaker: str | None = Field(None, description="Pacemaker architecture (null = the student's, with NxN filters).")
    shift_start: float = Field(
        0.0, ge=0, le=1, description="Training fraction where the hand-over to the teacher starts."
    )
    shift_end: float = Field(1.0, ge=0, le=1, description="Training fraction where the teacher has all the weight.")

    @model_validator(mode="after")
    def _check(self) -> PacemakerParams:
        if self.pacemaker is not None:
            MODELS.require(self.pacemaker)
        if self.shift_end <= self.shift_start:
            raise ValueError("method.shift_end must be above method.shift_start")
        return self


def teacher_weight(progress: float, start: float, end: float) -> float:
    """Share of the teacher in the KD target at ``progress`` (0 → pacemaker only, 1 → teacher only)."""
    return min(1.0, max(0.0, (progress - start) / (end - start)))


@METHODS.register("pacemaker")
class PacemakerKD(Method):
    """KD into a 1xN student from a pacemaker (guide 0), handing over to the teacher (guide 1)."""

    Params = PacemakerParams
    listed = 9
    summary = "Son et al. 2020: KD from an NxN pacemaker, shifting linearly to the teacher"

    @classmethod
    def plan_guides(cls, params: MethodParams, planner: Planner) -> list[str]:
        """The teacher, then the pacemaker (NxN filters; the student's architecture unless named) trained
        from it by KD at the same T and alpha; guide 0 is the pacemaker, guide 1 the teacher."""
        teacher = planner.teacher()
        model = ModelConfig(name=params.pacemaker or planner.cfg.student.name)  # type: ignore[attr-defined]
        kd = KDParams(temperature=params.temperature, alpha=params.alpha)  # type: ignore[attr-defined]
        return [planner.add("pacemaker", model, kd, [teacher]), teacher]

    def forward(self, batch: Batch, step: StepInfo) -> dict[str, torch.Tensor]:
        params: PacemakerParams = self.params  # type: ignore[assignment]
        student = self.student(batch.images)
        weight = teacher_weight(step.progress, params.shift_start, params.shift_end)
        terms = {"ce": (1 - params.alpha) * F.cross_entropy(student, batch.labels)}
        if weight < 1:
            pace = soft_kl(student, self.guide(0)(batch), params.temperature)
            terms["kd_pacemaker"] = params.alpha * (1 - weight) * pace
        if weight > 0:
            teach = soft_kl(student, self.guide(1)(batch), params.temperature)
            terms["kd_teacher"] = params.alpha * weight * teach
        return terms
