"""Feature-map mixup in a hidden layer (Oki & Kurita, ICONIP 2018, arXiv 1906.09739).

Two (Siamese) or three (triplet) weight-sharing passes compute the feature maps of two or three
samples at a named stage; the maps are mixed with weights w ~ Beta(α, α) (Dirichlet(α, α, α) for
three), the forward pass continues from that stage, and the labels are mixed with the same weights:

    h̃ = Σ_k w_k·h(x_{π_k}),   z = s.forward_from(stage, h̃)
    L = Σ_k w_k·CE(z, y_{π_k})  [+ w_kd·T²·KL(Σ_k w_k·softmax(t(x_{π_k})/T) ‖ softmax(z/T))]

π_1 is the identity and π_2, π_3 random permutations of the batch, so the weight-sharing passes are
one pass over the batch whose outputs are indexed (same weights, same samples, one BatchNorm
batch). The abstract reports mixing after the first convolution works better than mixing images,
so the default stage is the first one. ``w_kd = 0`` trains a model alone (teachers too); with
``w_kd > 0`` the KD target for the mixed sample is the same mixture of the teacher's softened
probabilities of the original samples. Where the paper is silent: one weight draw per batch, α = 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdray.data import Batch
from kdray.methods.base import METHODS, Method, MethodParams, Planner, StepInfo
from kdray.methods.losses import kl_to_target
from kdray.models import StagedNet


class FeatureMixupParams(MethodParams):
    name: Literal["feature_mixup"] = "feature_mixup"
    alpha: float = Field(1.0, gt=0, le=10, description="Beta / Dirichlet concentration of the mixing weights.")
    branches: Literal[2, 3] = Field(2, description="2 = Siamese (pairs), 3 = triplet network (triples).")
    stage: str | None = Field(None, description="Stage whose output is mixed (null = the first stage).")
    w_kd: float = Field(1.0, ge=0, le=100, description="Weight of the KD term on the mixed sample (0 = no teacher).")
    temperature: float = Field(4.0, gt=0, le=100, description="Softmax temperature T of the KD term.")


def mixing_weights(alpha: float, branches: int, rng: np.random.Generator) -> list[float]:
    """One draw of Beta(α, α) as (λ, 1 − λ), or of Dirichlet(α, α, α)."""
    return rng.dirichlet([alpha] * branches).tolist()


@METHODS.register("feature_mixup")
class FeatureMixup(Method):
    """Mixup of hidden feature maps with mixed labels, optionally with a mixed KD target."""

    Params = FeatureMixupParams
    listed = 5
    summary = "Oki & Kurita 2018: mix stage outputs of 2-3 samples (Beta/Dirichlet), mixed CE [+ KD to mixed target]"
    student_stages = 1

    @classmethod
    def plan_guides(cls, params: MethodParams, planner: Planner) -> list[str]:
        """A teacher only for the KD term: with ``w_kd = 0`` the method is a regulariser that trains alone."""
        return [planner.teacher()] if params.w_kd > 0 else []  # type: ignore[attr-defined]

    def __init__(self, student: StagedNet, guides: Sequence[nn.Module], params: FeatureMixupParams) -> None:
        super().__init__(student, guides, params)
        stage = params.stage or student.stage_names[0]
        if stage not in student.stage_names:
            raise ValueError(
                f"method.stage: '{stage}' is not a stage of the student ({', '.join(student.stage_names)})"
            )
        self.stage = stage

    def forward(self, batch: Batch, step: StepInfo) -> dict[str, torch.Tensor]:
        params: FeatureMixupParams = self.params  # type: ignore[assignment]
        images, labels = batch.images, batch.labels
        weights = mixing_weights(params.alpha, params.branches, step.rng)
        orders = [torch.arange(len(images), device=images.device)]
        orders += [step.permutation(len(images), images.device) for _ in range(params.branches - 1)]
        hidden = self.student.forward_to(self.stage, images)
        mixed = sum(w * hidden[order] for w, order in zip(weights, orders, strict=True))
        logits = self.student.forward_from(self.stage, mixed)
        terms = {"ce": sum(w * F.cross_entropy(logits, labels[o]) for w, o in zip(weights, orders, strict=True))}
        if params.w_kd:
            soft = F.softmax(self.guide(0)(batch).float() / params.temperature, dim=1)
            target = sum(w * soft[order] for w, order in zip(weights, orders, strict=True))
            terms["kd"] = params.w_kd * kl_to_target(logits, target, params.temperature)
        return terms
