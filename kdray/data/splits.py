"""Datasets as splits: in memory (uint8 image tensors) or on disk (image files read per batch).

Small-image datasets fit in memory many times over, so kdray keeps each such split as one tensor and
moves it to the training device once; batches are then index slices, never per-image Python. Data
larger than memory stays in its files (``FileSplit``) and is decoded per batch (``kdray.data.stream``).
Both kinds answer the same questions (length, labels, image shape, pixel sums, per-image digests), so
the validation split, subsets, normalisation statistics and the dataset fingerprint are computed by
one code path and agree exactly between the two.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import pyarrow as pa
import torch

from kdray.images import DataError, image_digest


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

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of every image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, index: torch.Tensor) -> Split:
        return Split(self.images[index], self.labels[index])

    def pixel_sums(self) -> tuple[list[int], list[int], int]:
        """Per-channel sums of the pixel values and of their squares (exact integers), and the pixels per channel.

        Summed in int64 chunks of about 4M values (32 MiB), so the sums never cost more than a few chunks.
        """
        sums = torch.zeros(self.images.shape[1], dtype=torch.int64)
        squares = torch.zeros_like(sums)
        chunk = max(1, 2**22 // self.images[0].numel()) if len(self) else 1
        for start in range(0, len(self), chunk):
            part = self.images[start : start + chunk].to(torch.int64)
            sums += part.sum(dim=(0, 2, 3))
            squares += part.square().sum(dim=(0, 2, 3))
        return sums.tolist(), squares.tolist(), len(self) * self.images.shape[2] * self.images.shape[3]

    def digests(self) -> np.ndarray:
        """[N, 16] uint8: each image's blake2b digest of its [C, H, W] uint8 bytes (what ``FileSplit`` holds)."""
        images = self.images.contiguous().numpy()
        return np.frombuffer(b"".join(image_digest(image) for image in images), dtype=np.uint8).reshape(-1, 16)

    def check_labels(self, num_classes: int, source: str) -> None:
        """Refuse labels outside ``[0, num_classes)``, naming ``source`` (the file they came from)."""
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= num_classes):
            bad = self.labels[(self.labels < 0) | (self.labels >= num_classes)][0].item()
            raise DataError(f"{source}: label {bad} is out of range for {num_classes} classes")


@dataclass(frozen=True)
class FileSplit:
    """A split that stays in its image files: paths and labels, and what a scan of every file found.

    ``sums``/``squares`` (int64 [N, C]) are each image's per-channel pixel sums, ``image_digests`` (uint8
    [N, 16]) its ``image_digest``, all of the image as training decodes it (``image_shape``), so statistics and the
    fingerprint of any subset are those an in-memory copy of the same images would give.
    """

    paths: pa.Array
    labels: torch.Tensor
    image_shape: tuple[int, int, int]
    sums: np.ndarray
    squares: np.ndarray
    image_digests: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> FileSplit:
        rows = index.numpy()
        return FileSplit(
            self.paths.take(pa.array(rows)), self.labels[index], self.image_shape, self.sums[rows],
            self.squares[rows], self.image_digests[rows],
        )  # fmt: skip

    def pixel_sums(self) -> tuple[list[int], list[int], int]:
        sums = [int(value) for value in self.sums.sum(axis=0, dtype=np.int64)]
        squares = [int(value) for value in self.squares.sum(axis=0, dtype=np.int64)]
        return sums, squares, len(self) * self.image_shape[1] * self.image_shape[2]

    def digests(self) -> np.ndarray:
        return self.image_digests


S = TypeVar("S", Split, FileSplit)


@dataclass(frozen=True)
class Dataset:
    """Train / val / test splits of one dataset, with the statistics used to normalise it."""

    name: str
    classes: list[str]
    train: Split | FileSplit
    val: Split | FileSplit
    test: Split | FileSplit | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    skipped: int = 0  # unreadable images left out (data.bad_images=skip)
    _fingerprint: list[str] = field(default_factory=list, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.train.image_shape[0]

    @property
    def image_size(self) -> int:
        return self.train.image_shape[-1]

    @property
    def streamed(self) -> bool:
        """Whether the images stay in their files and are decoded per batch."""
        return isinstance(self.train, FileSplit)

    def fingerprint(self) -> str:
        """A content hash of every split: two datasets with equal fingerprints hold the same data.

        The model store keys trained models on it, so the same images reached by different paths,
        on different machines, in memory or streamed, still share stored teachers. It hashes each
        image's digest (not the images themselves), so a streamed split never has to be read whole.
        """
        if not self._fingerprint:
            digest = hashlib.blake2b(digest_size=16)
            for split in (self.train, self.val, self.test):
                if split is not None:
                    digest.update(np.ascontiguousarray(split.digests()).tobytes())
                    digest.update(split.labels.contiguous().numpy().tobytes())
            digest.update("\n".join(self.classes).encode())
            self._fingerprint.append(digest.hexdigest())
        return self._fingerprint[0]


def stratified_split(split: S, fraction: float, seed: int) -> tuple[S, S]:
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


def stratified_subset(split: S, size: int, seed: int) -> S:
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


def channel_stats(split: Split | FileSplit) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (unbiased) std of a split's pixels on the 0..1 scale, at least 1e-3.

    Computed from exact integer sums, so a split in memory and the same images streamed from their
    files get bit-identical statistics.
    """
    sums, squares, count = split.pixel_sums()
    mean = tuple(total / (255 * count) for total in sums)
    variance = [
        (count * square - total * total) / (count * (count - 1) * 255**2)
        for total, square in zip(sums, squares, strict=True)
    ]
    return mean, tuple(max(value**0.5, 1e-3) for value in variance)
