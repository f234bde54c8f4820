"""Loss functions shared by several methods, each written once."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def kl_to_target(student_logits: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(target ‖ softmax(s/T))``, averaged over the batch; ``target`` holds probabilities.

    The T² factor keeps the gradient scale of the soft term independent of T (Hinton et al., 2015).
    The reduction is ``batchmean`` (sum over classes, mean over samples): ``reduction='mean'`` would
    also divide by the number of classes, a silent pitfall of several public implementations.
    Computed in float32 so that mixed precision does not round small probabilities away.
    """
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    return F.kl_div(log_student, target.float(), reduction="batchmean") * temperature**2


KLReduction = Literal["batchmean", "mean"]


def soft_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, reduction: KLReduction = "batchmean"
) -> torch.Tensor:
    """``T² · KL(softmax(t/T) ‖ softmax(s/T))``, batch mean: the KD term of Hinton et al. (2015).

    ``reduction="mean"`` also divides by the number of classes, as ``nn.KLDivLoss()`` does: what TAKD's and
    DGKD's published code computes, offered so those runs can be reproduced exactly as their code ran."""
    kl = kl_to_target(student_logits, F.softmax(teacher_logits.float() / temperature, dim=1), temperature)
    return kl / student_logits.shape[1] if reduction == "mean" else kl


def standardized(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Each sample's logits minus their mean, over their standard deviation (unbiased, as the authors' code):
    logit standardisation (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024), which
    lets the student match the teacher's logit *shape* without matching its range."""
    logits = logits.float()
    return (logits - logits.mean(dim=1, keepdim=True)) / (logits.std(dim=1, keepdim=True) + eps)


def comparable(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, standardize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits a distillation term compares: standardised when ``standardize`` (the LS option of kd, dkd and
    dist), else as they are. The cross-entropy on the labels always takes the raw student logits."""
    return (
        (standardized(student_logits), standardized(teacher_logits))
        if standardize
        else (student_logits, teacher_logits)
    )


def decoupled_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DKD's two parts of KD (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022), each ``T²·KL``,
    batch mean: TCKD between the binary distributions (target class, all others) and NCKD between the
    distributions over the non-target classes alone. Computed from log-softmaxes, so no probability is
    rounded to zero before its logarithm."""
    target = F.one_hot(labels, student_logits.shape[1]).bool()
    terms = []
    for part in ("binary", "others"):
        logs = []
        for logits in (teacher_logits, student_logits):
            scaled = logits.float() / temperature
            if part == "binary":
                whole = torch.logsumexp(scaled, dim=1)
                on_target = scaled[target] - whole
                off_target = torch.logsumexp(scaled.masked_fill(target, -torch.inf), dim=1) - whole
                logs.append(torch.stack([on_target, off_target], dim=1))
            else:
                logs.append(F.log_softmax(scaled.masked_fill(target, -torch.inf), dim=1))
        teacher_log, student_log = logs
        pointwise = teacher_log.exp() * (teacher_log - student_log)
        if part == "others":
            pointwise = pointwise.masked_fill(target, 0.0)  # the target class is not part of this distribution
        terms.append(pointwise.sum(dim=1).mean() * temperature**2)
    return terms[0], terms[1]


def pearson_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``1 − mean_i ρ(a_i, b_i)`` over the rows of two matrices (ρ: Pearson correlation)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return 1 - ((a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)).mean()


def relation_losses(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DIST's inter- and intra-class relation losses (Huang et al., "Knowledge Distillation from A Stronger
    Teacher", NeurIPS 2022), each ``τ²·(1 − mean Pearson correlation)`` of the softened predictions: per
    sample across classes (inter), and per class across the batch (intra)."""
    student = F.softmax(student_logits.float() / temperature, dim=1)
    teacher = F.softmax(teacher_logits.float() / temperature, dim=1)
    scale = temperature**2
    return scale * pearson_distance(student, teacher), scale * pearson_distance(student.T, teacher.T)
