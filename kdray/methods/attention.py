"""Attention transfer, AT (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017; code:
szagoruyko/attention-transfer, and RepDistiller's ``distiller_zoo/AT.py``, whose CIFAR-100 runs use it).

``L = w_ce·CE + β·Σ_j mean((Q_s^j − Q_t^j)²)``, ``Q^j = normalize(mean_c |A^j_c|^p)`` over every block group j
(every stage but the stem), the larger of two maps average-pooled to the smaller. RepDistiller: p = 2,
β = 1000 (``-b 1000``), w_ce = 1.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kdray.methods.base import METHODS
from kdray.methods.feature_base import FeatureMethod, FeatureParams, FeaturePass, paired_stages
from kdray.methods.feature_losses import attention_loss


class AttentionParams(FeatureParams):
    name: Literal["at"] = "at"
    beta: float = Field(1000.0, ge=0, le=1e6, description="Weight β of the attention term (RepDistiller: 1000).")
    p: float = Field(2.0, ge=1, le=8, description="Power p of the attention map (the paper and RepDistiller: 2).")


@METHODS.register("at")
class AttentionTransfer(FeatureMethod):
    """Match the spatial attention maps of every block group."""

    Params = AttentionParams
    listed = 20
    summary = "Zagoruyko & Komodakis 2017: match normalised attention maps of every block group"

    def feature_terms(self, student: FeaturePass, teacher: FeaturePass) -> dict[str, torch.Tensor]:
        params: AttentionParams = self.params  # type: ignore[assignment]
        count = paired_stages(len(student.stages), len(teacher.stages))
        pairs = zip(student.last(count), teacher.last(count), strict=True)
        return {"at": params.beta * sum(attention_loss(s, t, params.p) for s, t in pairs)}  # type: ignore[dict-item]
