"""Teacher-assistant chains: TAKD (Mirzadeh et al., AAAI 2020) and DGKD (Son, Na, Choi, Hwang, ICCV 2021).

A chain is planned here as ordinary stages: teacher → assistant 1 → … → student, the assistants
picked evenly from a ladder (``kdray.ladders``, ``assistants.depth``). Each link is trained by the
chain's method from its guides:

- TAKD: the next larger model only, by Hinton KD:
  ``L = (1 − α)·CE + α·T²·KL(softmax(z_prev/T) ‖ softmax(z_s/T))``.
- DGKD: every larger model (the teacher and every larger assistant), with stochastic teaching:
  ``L = (1 − λ)·CE + λ·T²·Σ_{k∈K} KL(softmax(z_k/T) ‖ softmax(z_s/T))``, where each mini-batch
  drops ``drop_num`` of the guides uniformly at random (the teacher's term too; at least one stays).
  Dropped guides are not evaluated (the authors' code runs them anyway). ``reduce: mean`` averages the
  kept terms instead of summing them.

Both authors' codes compute the KL with ``nn.KLDivLoss()``, whose mean reduction also divides by the
class count C; kdray's default is the batch mean (the KL as written, Hinton's scale), so for the same
(α or λ, T) kdray's KD term is C times theirs. ``kl_reduction: mean`` reproduces their code exactly.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from kdray.data import Batch
from kdray.methods.base import METHODS, Method, MethodParams, Planner, StepInfo
from kdray.methods.kd import KD, KDParams
from kdray.methods.losses import KLReduction, soft_kl


def plan_chain(params: MethodParams, planner: Planner, dense: bool) -> list[str]:
    """Plan teacher → assistants → (student); every link learns by the chain's method ``params``.

    TAKD (``dense`` false): each link's only guide is the next larger model. DGKD (``dense``): every
    larger model, teacher first. Returns the student's guides.
    """
    chain = [planner.teacher()]
    for index, name in enumerate(planner.assistant_models(), start=1):
        link = list(chain) if dense else [chain[-1]]
        chain.append(planner.assistant(index, name, params, link))
    return list(chain) if dense else [chain[-1]]


def chain_student_params(params: MethodParams, planner: Planner) -> MethodParams:
    """Without assistants both chains are Hinton KD from the teacher at the same T and weight (DGKD's one
    guide is never dropped, and its sum of one term is that term), so the student stage is planned as ``kd``."""
    if planner.assistant_models():
        return params
    return KDParams(
        temperature=params.temperature,  # type: ignore[attr-defined]
        alpha=params.alpha,  # type: ignore[attr-defined]
        kl_reduction=params.kl_reduction,  # type: ignore[attr-defined]
        logit_standardization=getattr(params, "logit_standardization", False),  # TAKD has it, DGKD not
    )


class TAKDParams(KDParams):
    name: Literal["takd"] = "takd"  # type: ignore[assignment]


@METHODS.register("takd")
class TAKD(KD):
    """Hinton KD along a chain: each link's single guide is the next larger model."""

    Params = TAKDParams
    listed = 7
    uses_assistants = True
    summary = "Mirzadeh et al. 2020: KD link by link along teacher > assistants > student"

    @classmethod
    def plan_guides(cls, params: MethodParams, planner: Planner) -> list[str]:
        return plan_chain(params, planner, dense=False)

    @classmethod
    def student_params(cls, params: MethodParams, planner: Planner) -> MethodParams:
        return chain_student_params(params, planner)


class DGKDParams(MethodParams):
    name: Literal["dgkd"] = "dgkd"
    temperature: float = Field(5.0, gt=0, le=100, description="Softmax temperature T (authors' code: 5).")
    alpha: float = Field(0.9, ge=0, le=1, description="lambda: weight of the KD sum; (1 - lambda) weighs CE.")
    drop_num: int = Field(1, ge=0, le=8, description="Guides dropped per mini-batch (at least one always stays).")
    reduce: Literal["sum", "mean"] = Field("sum", description="Sum (paper) or average the kept guides' KL terms.")
    kl_reduction: KLReduction = Field(
        "batchmean", description="batchmean (the formula) or mean (/ classes: the authors' code, nn.KLDivLoss())."
    )


@METHODS.register("dgkd")
class DGKD(Method):
    """Densely guided KD: learn from every larger model, dropping some guides per batch."""

    Params = DGKDParams
    listed = 8
    uses_assistants = True
    summary = "Son et al. 2021: (1-l)*CE + l*T^2*sum_k KL(z_k || z_s), drop_num guides dropped per batch"

    @classmethod
    def plan_guides(cls, params: MethodParams, planner: Planner) -> list[str]:
        return plan_chain(params, planner, dense=True)

    @classmethod
    def student_params(cls, params: MethodParams, planner: Planner) -> MethodParams:
        return chain_student_params(params, planner)

    def kept_guides(self, step: StepInfo) -> list[int]:
        """Indices of the guides used for this batch: all but ``drop_num`` of them, at least one."""
        params: DGKDParams = self.params  # type: ignore[assignment]
        count = len(self.guides)
        keep = max(1, count - params.drop_num)
        return sorted(step.rng.permutation(count)[:keep].tolist())

    def forward(self, batch: Batch, step: StepInfo) -> dict[str, torch.Tensor]:
        params: DGKDParams = self.params  # type: ignore[assignment]
        student = self.student(batch.images)
        kls = [
            soft_kl(student, self.guide(index)(batch), params.temperature, params.kl_reduction)
            for index in self.kept_guides(step)
        ]
        kd = torch.stack(kls).sum() / (len(kls) if params.reduce == "mean" else 1)
        return {"ce": (1 - params.alpha) * F.cross_entropy(student, batch.labels), "kd": params.alpha * kd}
