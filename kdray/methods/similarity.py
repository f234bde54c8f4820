"""Similarity-preserving distillation, SP (Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019;
RepDistiller's ``distiller_zoo/SP.py``, "verified by original author").

``L = w_ce·CE + β·‖G_t − G_s‖²_F / b²``, ``G = normalize_rows(F Fᵀ)`` the b × b similarities of the batch's
last-block-group features (the last stage). RepDistiller: β = 3000 (``-b 3000``), w_ce = 1. Only the batch's
relations are compared, so student and teacher may have any channel count and spatial size.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kdray.methods.base import METHODS
from kdray.methods.feature_base import FeatureMethod, FeatureParams, FeaturePass
from kdray.methods.feature_losses import similarity_loss


class SimilarityParams(FeatureParams):
    name: Literal["sp"] = "sp"
    beta: float = Field(3000.0, ge=0, le=1e6, description="Weight β of the similarity term (RepDistiller: 3000).")


@METHODS.register("sp")
class SimilarityPreserving(FeatureMethod):
    """Match the batch's pairwise similarities of the last stage's features."""

    Params = SimilarityParams
    listed = 21
    summary = "Tung & Mori 2019: match the batch's normalised Gram matrix of the last stage"

    def feature_terms(self, student: FeaturePass, teacher: FeaturePass) -> dict[str, torch.Tensor]:
        beta = self.params.beta  # type: ignore[attr-defined]
        return {"sp": beta * similarity_loss(student.last(1)[0], teacher.last(1)[0])}
