"""Deep mutual learning (Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning", CVPR 2018, arXiv 1706.00384).

m peer networks of the student's architecture, each its own initialisation, train together; each
learns from the labels and from the other peers' current predictions:

    L = Σ_k [ CE(z_k, y) + T² / (m − 1) · Σ_{l≠k} KL(softmax(z_l/T) ‖ softmax(z_k/T)) ]

with the peers' targets detached (the paper updates the peers in turn, each against the others'
predictions; updating all peers from one forward pass, as here, is what common re-implementations do).
The paper uses T = 1. Peer 0 is the deployed student. Nothing is shared between peers, so in
peer-parallel mode (one peer per worker) only the logits travel between workers.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdray.data import Batch
from kdray.methods.base import METHODS, MethodParams, StepInfo
from kdray.methods.ensemble import EnsembleMethod
from kdray.methods.losses import soft_kl
from kdray.models import StagedNet
from kdray.models.staged import init_weights


class DMLParams(MethodParams):
    name: Literal["dml"] = "dml"
    peers: int = Field(2, ge=2, le=8, description="Number of peer networks m (peer 0 is the student).")
    temperature: float = Field(1.0, gt=0, le=100, description="Softmax temperature T (the paper: 1).")


@METHODS.register("dml")
class DeepMutualLearning(EnsembleMethod):
    """m independent peers, each distilled from the others' predictions."""

    Params = DMLParams
    listed = 11
    summary = "Zhang et al. 2018: m peer students learn from each other's predictions"

    def __init__(self, student: StagedNet, guides: Sequence[nn.Module], params: DMLParams) -> None:
        super().__init__(student, guides, params)
        self.branches["0"] = student
        for index in range(1, params.peers):
            peer = copy.deepcopy(student)
            init_weights(peer)
            self.branches[str(index)] = peer
        self.owned = list(range(params.peers))

    @classmethod
    def branch_count(cls, params: MethodParams) -> int:
        return params.peers  # type: ignore[attr-defined]

    def run_branch(self, index: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.branches[str(index)](hidden), None

    def forward(self, batch: Batch, step: StepInfo) -> dict[str, torch.Tensor]:
        images, labels = batch.images, batch.labels
        temperature = self.params.temperature  # type: ignore[attr-defined]
        logits, _ = self.branch_outputs(images)
        mutual = [
            sum(soft_kl(z, other.detach(), temperature) for j, other in enumerate(logits) if j != k)
            for k, z in enumerate(logits)
        ]
        return {
            "ce": sum(F.cross_entropy(z, labels) for z in logits),
            "kd": sum(mutual) / (len(logits) - 1),
        }
