"""The feature and relation losses of the standard baselines, each written once, from the papers and read against
RepDistiller (HobbitLong/RepDistiller, ``distiller_zoo/``), whose CIFAR-100 numbers the baselines are quoted at.

Every function takes the student's tensor first and the frozen teacher's second and returns a scalar; they are
computed in float32, so mixed precision rounds none of the small quantities (normalised maps, probabilities).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def same_size(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two feature maps at one spatial size: the larger is average-pooled to the smaller (RepDistiller's AT)."""
    if student.shape[-2:] == teacher.shape[-2:]:
        return student, teacher
    if student.shape[-2] * student.shape[-1] > teacher.shape[-2] * teacher.shape[-1]:
        return F.adaptive_avg_pool2d(student, teacher.shape[-2:]), teacher
    return student, F.adaptive_avg_pool2d(teacher, student.shape[-2:])


def attention_map(features: torch.Tensor, p: float) -> torch.Tensor:
    """``normalize(mean_c |A_c|^p)`` per sample, flattened: where a network looks (Zagoruyko & Komodakis 2017).
    RepDistiller takes ``f.pow(p)``, which for p = 2 (and post-ReLU maps) is the same."""
    return F.normalize(features.float().abs().pow(p).mean(1).flatten(1), dim=1)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, p: float) -> torch.Tensor:
    """Mean squared difference of the two attention maps, over samples and positions."""
    student, teacher = same_size(student, teacher)
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


def similarity_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``‖G_t − G_s‖²_F / b²`` with ``G = normalize_rows(F Fᵀ)`` over the batch (Tung & Mori 2019)."""
    b = student.shape[0]
    gram_s = F.normalize(student.float().flatten(1) @ student.float().flatten(1).T, dim=1)
    gram_t = F.normalize(teacher.float().flatten(1) @ teacher.float().flatten(1).T, dim=1)
    return (gram_t - gram_s).pow(2).sum() / (b * b)


def pairwise_distances(embedding: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances between the rows, the diagonal exactly 0 (squared distances clamped at ``eps``)."""
    squared = embedding.pow(2).sum(1)
    distances = (squared[:, None] + squared[None, :] - 2 * embedding @ embedding.T).clamp(min=eps).sqrt()
    return distances * (1 - torch.eye(len(embedding), device=embedding.device, dtype=embedding.dtype))


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 between the pairwise distances, each divided by its mean over distinct pairs (Park et al. 2019)."""
    d_s = pairwise_distances(student.float().flatten(1))
    d_t = pairwise_distances(teacher.float().flatten(1))
    return F.smooth_l1_loss(d_s / d_s[d_s > 0].mean(), d_t / d_t[d_t > 0].mean())


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 between the cosines of the angles ``∠(e_i − e_j, e_k − e_j)`` over every triplet (Park et al.)."""

    def cosines(embedding: torch.Tensor) -> torch.Tensor:
        differences = F.normalize(embedding[None, :, :] - embedding[:, None, :], dim=2)
        return (differences @ differences.transpose(1, 2)).flatten()

    return F.smooth_l1_loss(cosines(student.float().flatten(1)), cosines(teacher.float().flatten(1)))


def pkt_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas 2018): each sample's cosine similarities to the batch,
    mapped to [0, 1] and normalised into a distribution, student's to teacher's by ``KL``, averaged over every
    (sample, sample) entry as the authors' code does."""

    def conditional(embedding: torch.Tensor) -> torch.Tensor:
        unit = embedding / (embedding.norm(dim=1, keepdim=True) + eps)
        similarity = (unit @ unit.T + 1) / 2
        return similarity / similarity.sum(1, keepdim=True)

    p_s, p_t = conditional(student.float().flatten(1)), conditional(teacher.float().flatten(1))
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def vid_loss(mean: torch.Tensor, target: torch.Tensor, log_scale: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Variational information distillation (Ahn et al. 2019): the negative log-likelihood of the teacher's map
    under a Gaussian whose mean is the student's regressed map and whose variance ``softplus(log_scale) + eps`` is
    learned per channel, constants dropped: ``mean(½((μ − t)²/σ² + log σ²))`` over samples, channels, positions."""
    variance = (F.softplus(log_scale.float()) + eps).view(1, -1, 1, 1)
    return (0.5 * ((mean.float() - target.float()).pow(2) / variance + variance.log())).mean()


def hierarchical_context_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """ReviewKD's HCL (Chen et al. 2021): the MSE of the two maps plus the MSEs of their 4x4, 2x2 and 1x1
    average-pooled versions (those smaller than the map), weighted 1/2, 1/4, 1/8, the sum divided by the sum of
    the weights."""
    student, teacher = student.float(), teacher.float()
    loss, weight, total = F.mse_loss(student, teacher), 1.0, 1.0
    for size in (4, 2, 1):
        if size >= student.shape[-2]:
            continue
        weight /= 2
        pooled = F.mse_loss(F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size))
        loss, total = loss + weight * pooled, total + weight
    return loss / total


def contrastive_nce_loss(scores: torch.Tensor, dataset_size: int, eps: float = 1e-7) -> torch.Tensor:
    """CRD's NCE loss (Tian et al. 2020, Eq. 18): ``scores`` [b, 1 + k] are ``exp(v·m/τ)/Z`` of each anchor with
    its positive (column 0) and its k negatives, the noise distribution uniform over the ``dataset_size``
    samples (``P_n = 1/N``); ``−(Σ log h(pos) + Σ log(1 − h(neg)))/b``, ``h(x) = x/(x + k·P_n)``."""
    k = scores.shape[1] - 1
    noise = k / dataset_size
    positive, negative = scores[:, 0], scores[:, 1:]
    log_positive = torch.log(positive / (positive + noise + eps))
    log_negative = torch.log(noise / (negative + noise + eps))
    return -(log_positive.sum() + log_negative.sum()) / scores.shape[0]
