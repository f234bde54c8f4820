"""Contrastive representation distillation, CRD (Tian, Krishnan, Isola, "Contrastive Representation
Distillation", ICLR 2020; the authors' HobbitLong/RepDistiller, ``crd/criterion.py`` and ``crd/memory.py``).

Student and teacher embeddings go through linear heads to ``d`` dimensions and unit length (v_s, v_t). A memory
bank holds a d-vector per training sample for each side (m_s, m_t). For every sample, its own index (the
positive) and k indices of samples of other classes (the negatives, RepDistiller's ``mode='exact'``) score

``h_s = exp(m_t[i]·v_s/τ)/Z_s`` and ``h_t = exp(m_s[i]·v_t/τ)/Z_t``,

Z fixed at the first batch as ``N·mean(exp(·/τ))``, and the NCE loss (Eq. 18, ``contrastive_nce_loss``) of
both sides is the CRD term: ``L = w_ce·CE + β·(NCE(h_s) + NCE(h_t))``. After each step each sample's bank row
becomes ``normalize(μ·m[i] + (1 − μ)·v)``. RepDistiller: β = 0.8 (``-b 0.8``), d = 128, k = 16384, τ = 0.07,
μ = 0.5, w_ce = 1.

The bank and Z are buffers of the method: checkpointed with the student's weights, so a resumed run continues
with the bank it had, and never stored with the student. Under data parallelism each worker's step updates
every worker's bank with all workers' rows (gathered), so the banks stay equal without DDP broadcasting them
(they are excluded from its buffer broadcast). Negatives are drawn with replacement from the step's own
generator (``StepInfo.rng``), so a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kdray.data import Batch
from kdray.distributed import WorkerContext, all_gather_cat, all_reduce_sum
from kdray.methods.base import METHODS, Parallel, StepInfo
from kdray.methods.feature_base import FeatureMethod, FeatureParams
from kdray.methods.feature_losses import contrastive_nce_loss
from kdray.models import ModelInfo


class CRDParams(FeatureParams):
    name: Literal["crd"] = "crd"
    beta: float = Field(0.8, ge=0, le=100, description="Weight β of the contrastive term (RepDistiller: 0.8).")
    feat_dim: int = Field(128, ge=2, le=4096, description="Width d of the embedding heads and the bank (128).")
    nce_k: int = Field(16384, ge=1, le=1_000_000, description="Negatives per sample, k (RepDistiller: 16384).")
    nce_t: float = Field(0.07, ge=0.001, le=10, description="Temperature τ of the scores (RepDistiller: 0.07).")
    nce_m: float = Field(0.5, ge=0, lt=1, description="Momentum μ of the memory bank's update (RepDistiller: 0.5).")


@METHODS.register("crd")
class ContrastiveRepresentation(FeatureMethod):
    """Tell each sample's teacher embedding apart from other classes' through a memory bank of the whole set."""

    Params = CRDParams
    listed = 25
    summary = "Tian et al. 2020: NCE between student and teacher embeddings against a memory bank of all samples"
    bank_buffers = ("memory_student", "memory_teacher", "normalizers")

    def connect(self, info: ModelInfo, train_labels: torch.Tensor) -> None:
        """The two embedding heads (from a probe batch's embedding widths) and the bank of every training sample."""
        params: CRDParams = self.params  # type: ignore[assignment]
        if len(torch.unique(train_labels)) < 2:
            raise ValueError("method.name=crd draws its negatives from other classes; the training set has one class")
        student, teacher = self.probe(info)
        self.embed_student = nn.Linear(student.embedding.shape[1], params.feat_dim)
        self.embed_teacher = nn.Linear(teacher.embedding.shape[1], params.feat_dim)
        bound = 1 / math.sqrt(params.feat_dim / 3)  # RepDistiller's uniform initialisation of the bank
        for name in ("memory_student", "memory_teacher"):
            self.register_buffer(name, torch.rand(len(train_labels), params.feat_dim) * 2 * bound - bound)
        self.register_buffer("normalizers", torch.full((2,), -1.0))  # Z_s, Z_t; set by the first batch
        self.register_buffer("train_labels", train_labels.clone(), persistent=False)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, list(self.bank_buffers))
        self.workers = WorkerContext(0, 1, torch.device("cpu"))
        self.normalizers_known = False

    def parallel(self, ctx: WorkerContext, parallelism: str, wrap) -> Parallel:  # type: ignore[no-untyped-def]
        self.workers = ctx  # whose bank rows to gather at each update
        return super().parallel(ctx, parallelism, wrap)

    def contrast_indices(self, index: torch.Tensor, labels: torch.Tensor, step: StepInfo) -> torch.Tensor:
        """[b, 1 + k]: each sample's own index, then k indices of samples of other classes."""
        k, size = self.params.nce_k, len(self.train_labels)  # type: ignore[attr-defined]
        generator = torch.Generator(index.device).manual_seed(int(step.rng.integers(2**62)))
        draws = torch.randint(0, size, (len(index), k), generator=generator, device=index.device)
        same = self.train_labels[draws] == labels[:, None]
        while same.any():  # redraw the ones of the sample's own class
            draws[same] = torch.randint(0, size, (int(same.sum()),), generator=generator, device=index.device)
            same = self.train_labels[draws] == labels[:, None]
        return torch.cat([index[:, None], draws], dim=1)

    def scores(self, memory: torch.Tensor, anchor: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
        """``exp(m[j]·v/τ)`` for each anchor v and each of its contrast indices j: [b, 1 + k]."""
        rows = memory[contrast]  # [b, 1 + k, d], a copy: the bank's update below does not touch it
        return torch.exp(torch.bmm(rows, anchor[:, :, None]).squeeze(2) / self.params.nce_t)  # type: ignore[attr-defined]

    def forward(self, batch: Batch, step: StepInfo) -> dict[str, torch.Tensor]:
        params: CRDParams = self.params  # type: ignore[assignment]
        student, teacher = self.passes(batch)
        ce = F.cross_entropy(student.logits, batch.labels)
        with torch.autocast(batch.images.device.type, enabled=False):  # unit vectors and exp() in float32
            v_s = F.normalize(self.embed_student(student.embedding.float()), dim=1)
            v_t = F.normalize(self.embed_teacher(teacher.embedding.float()), dim=1)
            contrast = self.contrast_indices(batch.index, batch.labels, step)
            h_s = self.scores(self.memory_teacher, v_s, contrast)
            h_t = self.scores(self.memory_student, v_t, contrast)
            self.set_normalizers(h_s, h_t)
            size = len(self.train_labels)
            nce = contrastive_nce_loss(h_s / self.normalizers[0], size) + contrastive_nce_loss(
                h_t / self.normalizers[1], size
            )
            self.update_bank(batch.index, v_s, v_t)
        return {"ce": params.ce_weight * ce, "crd": params.beta * nce}

    @torch.no_grad()
    def set_normalizers(self, h_s: torch.Tensor, h_t: torch.Tensor) -> None:
        """Z = N·mean of the first batch's scores (averaged over the workers), once; kept in the checkpoint (a
        restored Z is found by the first step's check, which is the only one that reads the buffer back)."""
        if self.normalizers_known:
            return
        self.normalizers_known = bool(self.normalizers[0] >= 0)
        if self.normalizers_known:
            return
        self.normalizers_known = True
        means = torch.stack([h_s.mean(), h_t.mean()]) / self.workers.world_size
        self.normalizers.copy_(all_reduce_sum(means, self.workers) * len(self.train_labels))

    @torch.no_grad()
    def update_bank(self, index: torch.Tensor, v_s: torch.Tensor, v_t: torch.Tensor) -> None:
        """Each sample's rows move towards its new embeddings by ``1 − μ`` and back to unit length."""
        momentum = self.params.nce_m  # type: ignore[attr-defined]
        index = all_gather_cat(index, self.workers)
        for memory, fresh in ((self.memory_student, v_s), (self.memory_teacher, v_t)):
            rows = memory[index] * momentum + all_gather_cat(fresh.detach(), self.workers) * (1 - momentum)
            memory.index_copy_(0, index, F.normalize(rows, dim=1))
