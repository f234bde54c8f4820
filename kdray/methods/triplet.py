"""Triplet-loss KD (Oki, Abe, Miyao, Kurita, "Triplet Loss for Knowledge Distillation", IJCNN 2020, arXiv 2004.08116).

Metric learning between teacher and student outputs: the anchor is the teacher's output for x, the
positive the student's output for x, the negative the student's output for a sample x⁻ of another
class in the same batch (no extra forward pass):

    L = CE(s(x), y) + w_kd·T²·KL(softmax(t(x)/T) ‖ softmax(s(x)/T))
        + w_tri·mean_x max(0, d(t(x), s(x)) − d(t(x), s(x⁻)) + margin)

The authors' code: L2 distance on raw logits, margin 5, w_tri 2, and (in a later version) the KL term
at T = 1 with weight 1; those are the defaults. ``variant: pair`` is the contrastive form named in
the abstract (Hadsell et al. 2006): ``d(t(x), s(x))² + max(0, margin − d(t(x), s(x⁻)))²``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from kdray.data import Batch
from kdray.methods.base import METHODS, Method, MethodParams, StepInfo
from kdray.methods.losses import soft_kl


class TripletParams(MethodParams):
    name: Literal["triplet"] = "triplet"
    margin: float = Field(5.0, ge=0, le=100, description="Margin between positive and negative distances.")
    w_tri: float = Field(2.0, ge=0, le=100, description="Weight of the triplet (or pair) term.")
    w_kd: float = Field(1.0, ge=0, le=100, description="Weight of the KL term (0 = triplet and CE only).")
    temperature: float = Field(1.0, gt=0, le=100, description="T of the KL term and of distance=probs.")
    distance: Literal["logits", "probs"] = Field("logits", description="L2 on raw logits or on softmax(z/T).")
    mining: Literal["random", "hardest", "semihard"] = Field("random", description="Negative choice in the batch.")
    variant: Literal["triplet", "pair"] = Field("triplet", description="Triplet margin loss or contrastive pairs.")


def pairwise_l2(anchors: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``[i, j] = ‖anchors[i] − candidates[j]‖₂``, exact (no matrix-product shortcut)."""
    return (anchors[:, None, :] - candidates[None, :, :]).pow(2).sum(-1).clamp_min(1e-12).sqrt()


def mine_negatives(
    distances: torch.Tensor,
    labels: torch.Tensor,
    positive: torch.Tensor,
    margin: float,
    mining: str,
    rng: np.random.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of each anchor's negative, and a mask of anchors that have one (another class in the batch).

    ``distances[i, j]`` is d(anchor i, candidate j); ``positive[i]`` is d(anchor i, its positive).
    hardest: the closest candidate of another class. semihard (FaceNet): the closest one farther
    than the positive but inside the margin, else the hardest. random: uniform among other classes
    (scores drawn from ``rng``).
    """
    other = labels[:, None] != labels[None, :]
    valid = other.any(1)
    inf = torch.finfo(distances.dtype).max
    hardest = distances.masked_fill(~other, inf).argmin(1)
    if mining == "hardest":
        return hardest, valid
    if mining == "semihard":
        band = other & (distances > positive[:, None]) & (distances < positive[:, None] + margin)
        semi = distances.masked_fill(~band, inf).argmin(1)
        return torch.where(band.any(1), semi, hardest), valid
    rng = rng or np.random.default_rng()
    scores = torch.as_tensor(rng.random(distances.shape), device=distances.device).masked_fill(~other, -1.0)
    return scores.argmax(1), valid


@METHODS.register("triplet")
class TripletKD(Method):
    """Triplet-loss KD from one frozen teacher."""

    Params = TripletParams
    listed = 4
    summary = "Oki et al. 2020: CE + w_kd*T^2*KL + w_tri*triplet(anchor t(x), pos s(x), neg s(x-))"

    def forward(self, batch: Batch, step: StepInfo) -> dict[str, torch.Tensor]:
        params: TripletParams = self.params  # type: ignore[assignment]
        labels = batch.labels
        student = self.student(batch.images).float()
        teacher = self.guide(0)(batch).float()
        terms = {"ce": F.cross_entropy(student, labels)}
        if params.w_kd:
            terms["kd"] = params.w_kd * soft_kl(student, teacher, params.temperature)
        if params.distance == "probs":
            anchors, outputs = (F.softmax(z / params.temperature, dim=1) for z in (teacher, student))
        else:
            anchors, outputs = teacher, student
        distances = pairwise_l2(anchors, outputs)
        positive = distances.diagonal()
        negative_index, valid = mine_negatives(
            distances.detach(), labels, positive.detach(), params.margin, params.mining, step.rng
        )
        negative = distances.gather(1, negative_index[:, None]).squeeze(1)
        if params.variant == "pair":
            per_sample = positive.pow(2) + F.relu(params.margin - negative).pow(2)
        else:
            per_sample = F.relu(positive - negative + params.margin)
        metric = per_sample[valid].mean() if valid.any() else per_sample.sum() * 0
        terms[params.variant] = params.w_tri * metric
        return terms
