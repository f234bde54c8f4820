"""Online multi-branch KD with a Feature Fusion Module and Classifier Diversification
(Li et al., "Online Knowledge Distillation via Multi-branch Diversity Enhancement", ACCV 2020, arXiv 2010.00795).

No pretrained teacher: the student's stages up to the last are shared, and m branches each own a
copy of the last stage and of the head. Branch 0 is the student's own last stage and head, so the
deployable student is an ordinary model of the student architecture.

- Feature Fusion Module (FFM): the branches' last-stage maps are concatenated, mixed by a 1x1
  convolution, re-weighted by channel attention (squeeze-and-excitation) and classified: ``z_f``.
- Target: ``z_ens = z_f`` with the FFM, else the mean of the branch logits (ONE/DML-style baseline);
  it is detached, so the branches learn from it without pulling it towards themselves.
- Classifier Diversification (CD) over the branch classifiers' weights W_b (classes × features), with
  gradient (a public re-implementation detaches W, which makes the term a constant). ``cd_form:
  cosine`` (default): the mean, over pairs of branches, of the mean squared cosine between a class
  vector of one and a class vector of the other — in [0, 1], blind to the weights' scale, and 0
  exactly when the branches classify from mutually orthogonal feature directions. ``cd_form: gram``:
  ``Σ_{i<j} ‖W_iᵀ W_j‖²_F`` as the public re-implementations compute it (λ_cd ≈ 5e-8 there); it is
  not zero for classifiers in disjoint subspaces and scales with the fourth power of the weights, so
  weight decay alone moves it more than the term does.

    L = Σ_b [CE(z_b, y) + r(p)·T²·KL(softmax(z_ens/T) ‖ softmax(z_b/T))] + CE(z_f, y) + λ_cd·CD

``r(p) = exp(−5(1 − min(1, p/rampup))²)`` is the sigmoid-shaped ramp-up of the co-author's OKDDip code
(80 of 300 epochs there, so ``rampup`` = 0.25 of training by default). T = 3 and m = 4 follow the
re-implementations named in docs/methods.md (the paper itself could not be read); λ_cd's default for
the cosine form was chosen by measurement (benchmarks/cd_diversity.py, docs/methods.md).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdray.data import Batch
from kdray.methods.base import METHODS, MethodParams, StepInfo
from kdray.methods.ensemble import EnsembleMethod, ensemble_statistics
from kdray.methods.losses import soft_kl
from kdray.models import StagedNet
from kdray.models.staged import init_weights

CD_WEIGHT = 10.0  # the cosine form's default, measured: docs/methods.md "Classifier Diversification, measured"


class OnlineBranchParams(MethodParams):
    name: Literal["online_branch"] = "online_branch"
    branches: int = Field(4, ge=2, le=8, description="Number of branches m.")
    temperature: float = Field(3.0, gt=0, le=100, description="Softmax temperature T.")
    ffm: bool = Field(True, description="Feature Fusion Module target (false = mean of branches, ONE/DML-style).")
    cd_weight: float = Field(
        CD_WEIGHT, ge=0, le=100, description="Weight of the Classifier Diversification loss (0 = off)."
    )
    cd_form: Literal["cosine", "gram"] = Field(
        "cosine", description="cosine: scale-free, 0 for orthogonal classifiers; gram: the re-implementations' form."
    )
    rampup: float = Field(0.25, ge=0, le=1, description="Fraction of training over which the KD weight ramps up.")


class FeatureFusion(nn.Module):
    """Concatenate branch maps, mix them (1x1 conv), apply channel attention, classify."""

    def __init__(self, channels: int, branches: int, num_classes: int) -> None:
        super().__init__()
        self.mix = nn.Sequential(
            nn.Conv2d(channels * branches, channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        hidden = max(4, channels // 4)
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(channels, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels),
            nn.Sigmoid(),
        )
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        mixed = self.mix(torch.cat(list(features), dim=1))
        attended = mixed * self.attention(mixed)[:, :, None, None]
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(attended, 1), 1))


def classifier_diversity(weights: Sequence[torch.Tensor], form: str = "cosine") -> torch.Tensor:
    """How alike the branch classifiers are (lower: more diverse). ``cosine``: mean over pairs of branches of
    the mean squared cosine between their class vectors (rows of W); ``gram``: ``Σ_{i<j} ‖W_iᵀ W_j‖²_F``."""
    pairs = list(itertools.combinations(weights, 2))
    if form == "gram":
        return sum((wi.t() @ wj).pow(2).sum() for wi, wj in pairs)
    unit = {id(w): F.normalize(w, dim=1) for w in weights}
    return torch.stack([(unit[id(wi)] @ unit[id(wj)].t()).pow(2).mean() for wi, wj in pairs]).mean()


def rampup_weight(progress: float, rampup: float) -> float:
    if rampup <= 0:
        return 1.0
    done = min(1.0, progress / rampup)
    return math.exp(-5.0 * (1.0 - done) ** 2)


class Branch(nn.Module):
    """One branch: a copy of the student's last stage and its head."""

    def __init__(self, stage: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.stage = stage
        self.head = head

    @property
    def classifier(self) -> nn.Linear:
        return [m for m in self.head.modules() if isinstance(m, nn.Linear)][-1]

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature = self.stage(hidden)
        return self.head(feature), feature


@METHODS.register("online_branch")
class OnlineBranch(EnsembleMethod):
    """m branches on shared low-level stages, taught by their fused (or averaged) prediction."""

    Params = OnlineBranchParams
    listed = 10
    summary = "Li et al. 2020: m branches, FFM-fused soft target, classifier-diversification loss"
    student_stages = 2

    def __init__(self, student: StagedNet, guides: Sequence[nn.Module], params: OnlineBranchParams) -> None:
        super().__init__(student, guides, params)
        if len(student.stage_names) < 2:
            raise ValueError("online_branch needs a student with at least two stages")
        self.shared_until = student.stage_names[-2]
        last = student.stages[student.stage_names[-1]]
        self.branches["0"] = Branch(last, student.head)
        for index in range(1, params.branches):
            stage, head = copy.deepcopy(last), copy.deepcopy(student.head)
            init_weights(stage)
            init_weights(head)
            self.branches[str(index)] = Branch(stage, head)
        self.owned = list(range(params.branches))
        channels = [m for m in last.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
        num_classes = student.classifier.out_features
        self.fusion = FeatureFusion(channels, params.branches, num_classes) if params.ffm else None

    @classmethod
    def branch_count(cls, params: MethodParams) -> int:
        return params.branches  # type: ignore[attr-defined]

    def shared_modules(self) -> list[nn.Module]:
        """The trunk (every stage of the student but the last) and the fusion module."""
        names = self.student.stage_names[:-1]
        return [*(self.student.stages[n] for n in names), *([self.fusion] if self.fusion is not None else [])]

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        return self.student.forward_to(self.shared_until, images)

    def run_branch(self, index: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.branches[str(index)](hidden)

    def forward(self, batch: Batch, step: StepInfo) -> dict[str, torch.Tensor]:
        images, labels = batch.images, batch.labels
        params: OnlineBranchParams = self.params  # type: ignore[assignment]
        logits, features = self.branch_outputs(images)
        fused = self.fusion(features) if self.fusion is not None else None
        target = (fused if fused is not None else torch.stack(logits).mean(0)).detach()
        weight = rampup_weight(step.progress, params.rampup)
        terms = {
            "ce": sum(F.cross_entropy(z, labels) for z in logits),
            "kd": weight * sum(soft_kl(z, target, params.temperature) for z in logits),
        }
        if fused is not None:
            terms["ce_fused"] = F.cross_entropy(fused, labels)
        if params.cd_weight:
            weights = self.collect([self.branches[str(i)].classifier.weight for i in self.owned])
            terms["cd"] = params.cd_weight * classifier_diversity(weights, params.cd_form)
        return terms

    def eval_terms(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-branch, ensemble and fused accuracy, the branches' mean pairwise disagreement, and how alike their
        classifiers are (the cosine CD, whatever form trains: one yardstick across runs)."""
        logits, features = self.branch_outputs(images)
        terms = ensemble_statistics(logits, labels)
        weights = self.collect([self.branches[str(i)].classifier.weight.detach() for i in self.owned])
        terms["classifier_similarity"] = classifier_diversity(weights).expand(len(labels))
        if self.fusion is not None:
            terms["acc_fused"] = (self.fusion(features).argmax(1) == labels).float()
        return terms
