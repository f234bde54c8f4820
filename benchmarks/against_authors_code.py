"""Do kdray's logit losses compute what their authors' code computes? Values and gradients, same inputs.

    git clone https://github.com/sunshangquan/logit-standardization-KD ls-kd      # LS, with mdistiller's KD/DKD
    git clone https://github.com/hunto/image_classification_sota dist-kd          # DIST (hunto/DIST_KD's code)
    git clone https://github.com/i13abe/Triplet-Loss-for-Knowledge-Distillation triplet-kd
    python benchmarks/against_authors_code.py --ls-repo ls-kd --dist-repo dist-kd --triplet-repo triplet-kd

For each recipe of the CPU methods table (kd, kd + LS at kd's defaults and at the LS authors' recipe, dkd, dkd +
LS at its authors' recipe, dist, triplet) it builds the kdray method, runs it on fixed random logits and labels, and
runs the authors' own loss functions, imported from their checkouts (nothing of theirs is copied here), on the
same tensors with the same weights. It prints the total loss of each and the largest difference of the
gradients with respect to the student's logits. The losses are compared whole, CE included, so a weight that
reaches the wrong term shows too. Exit status 1 if any relative difference exceeds ``--tolerance``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdray.data import Batch
from kdray.methods import METHODS, StepInfo

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def load_module(package: str, folder: Path, name: str) -> types.ModuleType:
    """Import ``folder/name.py`` as ``package.name`` without running the package's ``__init__`` (which imports
    every distiller and their dependencies): a bare package object is enough for its relative imports."""
    if package not in sys.modules:
        parent = types.ModuleType(package)
        parent.__path__ = [str(folder)]
        sys.modules[package] = parent
    spec = importlib.util.spec_from_file_location(f"{package}.{name}", folder / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class FixedLogits(nn.Module):
    """A teacher that answers every batch with the same logits."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits


def kdray_loss(name: str, params: dict[str, Any]) -> Loss:
    """kdray's method ``name`` at ``params``: its terms summed. The student is the identity, so the "images"
    are the student's logits and the gradient is taken with respect to them."""

    def loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, epoch: int) -> torch.Tensor:
        method = METHODS[name](nn.Identity(), [FixedLogits(teacher)], METHODS[name].Params(**params)).train()
        batch = Batch(student, labels, torch.arange(len(labels)))
        return sum(method(batch, StepInfo(epoch - 1, 0, 1, 1)).values())  # StepInfo counts epochs from 0

    return loss


def hardest_negatives(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sample's hardest negative: the other-class student output closest to its teacher output."""
    distances = torch.cdist(teacher, student.detach())
    return distances.masked_fill(labels[:, None] == labels[None, :], torch.inf).argmin(dim=1)


def authors_losses(ls_repo: Path, dist_repo: Path, triplet_repo: Path) -> dict[str, tuple[Loss, str, dict[str, Any]]]:
    """Each recipe: the authors' loss (their functions, their way of weighting them) and kdray's parameters."""
    distillers = ls_repo / "mdistiller" / "distillers"
    kd = load_module("mdistiller_distillers", distillers, "KD").kd_loss
    dkd = load_module("mdistiller_distillers", distillers, "DKD").dkd_loss
    dist_module = load_module("image_classification_losses", dist_repo / "lib" / "models" / "losses", "dist_kd")
    triplet_kl = load_module("triplet_kd_utils", triplet_repo / "utils", "kldivloss").KLDivLoss(reduction="batchmean")

    def kd_recipe(ce_weight: float, kd_weight: float, temperature: float, stand: bool) -> Loss:
        # mdistiller's KD.forward_train: ce_weight * CE + kd_weight * kd_loss(s, t, T, logit_stand)
        return lambda s, t, y, epoch: ce_weight * F.cross_entropy(s, y) + kd_weight * kd(s, t, temperature, stand)

    def dkd_recipe(alpha: float, beta: float, temperature: float, warmup: int, stand: bool) -> Loss:
        # mdistiller's DKD.forward_train: CE (weight 1) + min(epoch / warmup, 1) * dkd_loss(...)
        return lambda s, t, y, epoch: (
            F.cross_entropy(s, y) + min(epoch / warmup, 1.0) * dkd(s, t, y, alpha, beta, temperature, stand)
        )

    def dist_recipe() -> Loss:
        # configs/strategies/distill/dist_cifar.yaml: ori_loss_weight 1, kd_loss_weight 2, kd dist_t4 (beta = gamma
        # = 1, tau = 4); kdray's defaults fold the 2 into beta = gamma = 2
        dist = dist_module.DIST(beta=1.0, gamma=1.0, tau=4.0)
        return lambda s, t, y, epoch: F.cross_entropy(s, y) + 2.0 * dist(s, t)

    def triplet_recipe() -> Loss:
        # student.py: KLDivLoss(batchmean) on T = 1 + LAMBDA 1 * CE + TriLAMBDA 2 * TripletMarginLoss(margin 5)(teacher
        # output, student output, the student's output on another class's image). Their negative is an extra image
        # of another class; kdray takes it from the batch, so both get the batch's hardest one (mining: hardest).
        triplet = nn.TripletMarginLoss(margin=5.0)
        return lambda s, t, y, epoch: (
            triplet_kl(s, t) + F.cross_entropy(s, y) + 2.0 * triplet(t, s, s[hardest_negatives(s, t, y)])
        )

    ls_kd = {"ce_weight": 0.1, "kd_weight": 9.0, "temperature": 2.0, "logit_standardization": True}
    ls_dkd = {"logit_standardization": True, "temperature": 2.0, "alpha": 9.0, "beta": 72.0, "ce_weight": 1.0}
    return {
        "kd (T 4, alpha 0.9)": (kd_recipe(0.1, 0.9, 4.0, False), "kd", {}),
        "kd + LS at kd's defaults": (kd_recipe(0.1, 0.9, 4.0, True), "kd", {"logit_standardization": True}),
        "kd + LS, authors' recipe": (kd_recipe(0.1, 9.0, 2.0, True), "kd", ls_kd),
        "dkd (alpha 1, beta 8, T 4)": (dkd_recipe(1.0, 8.0, 4.0, 20, False), "dkd", {}),
        "dkd + LS, authors' recipe": (dkd_recipe(9.0, 72.0, 2.0, 20, True), "dkd", ls_dkd),
        "dist (beta = gamma = 2, tau 4)": (dist_recipe(), "dist", {}),
        "triplet (margin 5, w 2, KL at T 1)": (triplet_recipe(), "triplet", {"mining": "hardest"}),
    }


def compare(theirs: Loss, ours: Loss, classes: int, epoch: int, seed: int) -> tuple[float, float, float]:
    """Both losses and the largest gradient difference (relative to the largest gradient) on one batch."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(64, classes, generator=generator) * 3
    teacher = torch.randn(64, classes, generator=generator) * 5
    labels = torch.randint(0, classes, (64,), generator=generator)
    values, grads = [], []
    for loss in (theirs, ours):
        logits = student.clone().requires_grad_(True)
        value = loss(logits, teacher, labels, epoch)
        value.backward()
        values.append(value.item())
        grads.append(logits.grad)
    gap = (grads[0] - grads[1]).abs().max().item() / grads[0].abs().max().item()
    return values[0], values[1], gap


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ls-repo", type=Path, required=True, help="checkout of sunshangquan/logit-standardization-KD")
    parser.add_argument("--dist-repo", type=Path, required=True, help="a checkout of hunto/image_classification_sota")
    parser.add_argument("--triplet-repo", type=Path, required=True, help="checkout of i13abe/Triplet-Loss-for-KD")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="largest relative difference accepted")
    args = parser.parse_args()
    failed = False
    print(f"{'recipe':34} {'classes':>7} {'epoch':>5} {'authors':>12} {'kdray':>12} {'rel. diff':>9} {'grad diff':>9}")
    for recipe, (theirs, name, params) in authors_losses(args.ls_repo, args.dist_repo, args.triplet_repo).items():
        for classes in (10, 100):
            for epoch in (5, 30):  # inside and past DKD's 20-epoch warm-up
                their_value, our_value, grad_gap = compare(
                    theirs, kdray_loss(name, params), classes, epoch, seed=classes
                )
                value_gap = abs(their_value - our_value) / abs(their_value)
                failed |= max(value_gap, grad_gap) > args.tolerance
                print(
                    f"{recipe:34} {classes:>7} {epoch:>5} {their_value:>12.6f} {our_value:>12.6f} "
                    f"{value_gap:>9.1e} {grad_gap:>9.1e}"
                )
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
