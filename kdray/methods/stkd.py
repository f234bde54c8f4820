"""STKD, similarity transfer with mixup (Zhao, Gong, Sun, Dong, Yu, arXiv 2103.10047, 2021).

Mixup builds a virtual sample x̃ = λ·x_i + (1−λ)·x_j with λ ~ Beta(α, α) and a partner j drawn by a
random permutation of the batch; teacher and student both see x̃:

    L = λ·CE(s(x̃), y_i) + (1−λ)·CE(s(x̃), y_j) + β·T²·KL(softmax(t(x̃)/T) ‖ softmax(s(x̃)/T))
        [+ γ·T²·KL(softmax(t(x)/T) ‖ softmax(s(x)/T))  with γ > 0: vanilla KD on the clean batch]

The mixed labels make the teacher's similarities between the two classes (and the others) part
of the target. Where the paper is silent: one λ per batch (as mixup's reference code), α = 1
(mixup's CIFAR default), β = 1, T = 4, γ = 0.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from kdray.data import Batch
from kdray.methods.base import METHODS, Method, MethodParams, StepInfo
from kdray.methods.losses import soft_kl


class STKDParams(MethodParams):
    name: Literal["stkd"] = "stkd"
    alpha: float = Field(1.0, gt=0, le=10, description="Beta(alpha, alpha) of the mixing weight.")
    beta: float = Field(1.0, ge=0, le=100, description="Weight of the KL term on the mixed sample.")
    temperature: float = Field(4.0, gt=0, le=100, description="Softmax temperature T.")
    clean_kd: float = Field(0.0, ge=0, le=100, description="Weight gamma of vanilla KD on the clean batch (0 = off).")


def mixed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, partners: torch.Tensor, lam: float) -> torch.Tensor:
    """``λ·CE(z, y) + (1 − λ)·CE(z, y[partners])``: cross-entropy against the mixed label."""
    return lam * F.cross_entropy(logits, labels) + (1 - lam) * F.cross_entropy(logits, labels[partners])


@METHODS.register("stkd")
class STKD(Method):
    """Similarity transfer: KD on mixup samples with mixed labels."""

    Params = STKDParams
    listed = 6
    summary = "Zhao et al. 2021: mixup x~ seen by teacher and student; mixed CE + beta*T^2*KL on x~"

    def forward(self, batch: Batch, step: StepInfo) -> dict[str, torch.Tensor]:
        params: STKDParams = self.params  # type: ignore[assignment]
        images, labels = batch.images, batch.labels
        lam = float(step.rng.beta(params.alpha, params.alpha))
        partners = step.permutation(len(images), images.device)
        mixed = lam * images + (1 - lam) * images[partners]  # a plain tensor: the guide always runs on it
        student = self.student(mixed)
        terms = {
            "ce": mixed_cross_entropy(student, labels, partners, lam),
            "kd": params.beta * soft_kl(student, self.guide(0)(mixed), params.temperature),
        }
        if params.clean_kd:
            clean = self.student(images)
            teacher = self.guide(0)(batch)  # the clean batch: the cache may answer
            terms["kd_clean"] = params.clean_kd * soft_kl(clean, teacher, params.temperature)
        return terms
