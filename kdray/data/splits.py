"""In-memory datasets: uint8 image tensors and int64 labels, split into train / val / test.

Small-image datasets fit in memory many times over, so kdray keeps each split as one tensor and
moves it to the training device once; batches are then index slices, never per-image Python.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch


class DataError(ValueError):
    """Bad data on disk: the message names the file or folder and what is wrong with it."""


@dataclass(frozen=True)
class Split:
    """One split: ``images`` uint8 [N, C, H, W], ``labels`` int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> Split:
        return Split(self.images[index], self.labels[index])

    def check_labels(self, num_classes: int, source: str) -> None:
        """Refuse labels outside ``[0, num_classes)``, naming ``source`` (the file they came from)."""
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= num_classes):
            bad = self.labels[(self.labels < 0) | (self.labels >= num_classes)][0].item()
            raise DataError(f"{source}: label {bad} is out of range for {num_classes} classes")


@dataclass(frozen=True)
class Dataset:
    """Train / val / test splits of one dataset, with the statistics used to normalise it."""

    name: str
    classes: list[str]
    train: Split
    val: Split
    test: Split | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    _fingerprint: list[str] = field(default_factory=list, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train.images.shape[-1]

    def fingerprint(self) -> str:
        """A content hash of every split: two datasets with equal fingerprints hold the same data.

        The model store keys trained models on it, so the same images reached by different paths,
        on different machines, still share stored teachers.
        """
        if not self._fingerprint:
            digest = hashlib.blake2b(digest_size=16)
            for split in (self.train, self.val, self.test):
                if split is not None:
                    digest.update(split.images.contiguous().numpy().tobytes())
                    digest.update(split.labels.contiguous().numpy().tobytes())
            digest.update("\n".join(self.classes).encode())
            self._fingerprint.append(digest.hexdigest())
        return self._fingerprint[0]


def stratified_split(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Split off ``fraction`` of every class (at least one image of each) with a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    held_out: list[torch.Tensor] = []
    for label in torch.unique(split.labels):
        members = torch.nonzero(split.labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        count = max(1, round(fraction * len(members))) if len(members) > 1 else 0
        held_out.append(members[:count])
    mask = torch.zeros(len(split), dtype=torch.bool)
    mask[torch.cat(held_out)] = True
    return split.subset(torch.nonzero(~mask).flatten()), split.subset(torch.nonzero(mask).flatten())


def stratified_subset(split: Split, size: int, seed: int) -> Split:
    """Keep about ``size`` images with the class proportions of ``split`` (for quick CPU runs)."""
    if size >= len(split):
        return split
    kept, _ = stratified_split(split, 1 - size / len(split), seed)
    return kept


def resize_split(split: Split, size: int, chunk: int = 4096) -> Split:
    """Every image of ``split`` resized to ``size`` x ``size`` (antialiased bilinear), still uint8."""
    import torch.nn.functional as F

    parts = []
    for start in range(0, len(split), chunk):
        images = split.images[start : start + chunk].float()
        scaled = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        parts.append(scaled.round_().clamp_(0, 255).to(torch.uint8))
    return Split(torch.cat(parts), split.labels)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, on the 0..1 scale."""
    scaled = images.to(torch.float64).div_(255).transpose(0, 1).reshape(images.shape[1], -1)
    std = scaled.std(dim=1).clamp_min(1e-3)
    return tuple(scaled.mean(dim=1).tolist()), tuple(std.tolist())
