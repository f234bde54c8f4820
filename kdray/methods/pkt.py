"""Probabilistic knowledge transfer, PKT (Passalis & Tefas, "Learning Deep Representations with Probabilistic
Knowledge Transfer", ECCV 2018; code: passalis/probabilistic_kt, as RepDistiller's ``distiller_zoo/PKT.py``).

``L = w_ce·CE + β·mean_{i,j} P_t(j|i)·log((P_t(j|i) + ε) / (P_s(j|i) + ε))`` on the embeddings, with
``P(j|i) ∝ (cos(e_i, e_j) + 1) / 2`` over the batch (the cosine kernel), ε = 1e-7. RepDistiller's runs:
β = 30000 (``-b 30000``), w_ce = 1. The mean runs over all b² entries, as that code (not a per-sample sum).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kdray.methods.base import METHODS
from kdray.methods.feature_base import FeatureMethod, FeatureParams, FeaturePass
from kdray.methods.feature_losses import pkt_loss


class PKTParams(FeatureParams):
    name: Literal["pkt"] = "pkt"
    beta: float = Field(30000.0, ge=0, le=1e7, description="Weight β of the PKT term (RepDistiller: 30000).")


@METHODS.register("pkt")
class ProbabilisticKT(FeatureMethod):
    """Match each sample's distribution of cosine similarities to the batch."""

    Params = PKTParams
    listed = 23
    summary = "Passalis & Tefas 2018: match the batch's cosine-similarity distributions of the embeddings"

    def feature_terms(self, student: FeaturePass, teacher: FeaturePass) -> dict[str, torch.Tensor]:
        return {"pkt": self.params.beta * pkt_loss(student.embedding, teacher.embedding)}  # type: ignore[attr-defined]
