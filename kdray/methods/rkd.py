"""Relational knowledge distillation, RKD (Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019;
RepDistiller's ``distiller_zoo/RKD.py``).

``L = w_ce·CE + β·(w_d·L_dist + w_a·L_angle)`` on the embeddings (the pooled features the classifier reads):
``L_dist`` the smooth-L1 between pairwise distances each divided by its mean over distinct pairs, ``L_angle``
the smooth-L1 between the cosines of every triplet's angle. RepDistiller and the paper: w_d = 25, w_a = 50;
RepDistiller's runs β = 1 (``-b 1``), w_ce = 1. Relations only: any embedding widths pair.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kdray.methods.base import METHODS
from kdray.methods.feature_base import FeatureMethod, FeatureParams, FeaturePass
from kdray.methods.feature_losses import rkd_angle_loss, rkd_distance_loss


class RKDParams(FeatureParams):
    name: Literal["rkd"] = "rkd"
    beta: float = Field(1.0, ge=0, le=1e4, description="Weight β of the whole RKD term (RepDistiller: 1).")
    distance_weight: float = Field(25.0, ge=0, le=1e4, description="w_d of the distance term (the paper: 25).")
    angle_weight: float = Field(50.0, ge=0, le=1e4, description="w_a of the angle term (the paper: 50).")


@METHODS.register("rkd")
class RelationalKD(FeatureMethod):
    """Match the distances and angles between the batch's embeddings."""

    Params = RKDParams
    listed = 22
    summary = "Park et al. 2019: match the batch's embedding distances and triplet angles"

    def feature_terms(self, student: FeaturePass, teacher: FeaturePass) -> dict[str, torch.Tensor]:
        params: RKDParams = self.params  # type: ignore[assignment]
        return {
            "rkd_distance": params.beta
            * params.distance_weight
            * rkd_distance_loss(student.embedding, teacher.embedding),
            "rkd_angle": params.beta * params.angle_weight * rkd_angle_loss(student.embedding, teacher.embedding),
        }
