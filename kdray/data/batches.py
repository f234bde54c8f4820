"""Batches: a seeded permutation per epoch, one shard per rank, augmented and normalised on the device.

Every rank draws the same permutation of the epoch and takes every ``world_size``-th index of it, so
the shards never overlap and together cover the epoch. Where the images come from is the split's
business (``images_of``): a ``DeviceSplit`` holds them all on the device and slices, a
``kdray.data.stream.StreamedSplit`` decodes them from their files on Ray Data. Everything else (which
images, in which batches, with which crops and flips) is decided here, once, for both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from kdray.data.augment import (
    AugmentParams,
    EpochAugment,
    ResizedCrops,
    apply_augment,
    normalize,
    sample_augment,
    view_count,
    view_ids,
)
from kdray.data.splits import Split


@dataclass(frozen=True)
class Views:
    """Which view of which training image each row of a batch is, on the host (numpy, so that DDP's
    input handling never moves it to the GPU): what the guide-output cache looks rows up by.

    ``samples``: positions in the training split; ``views``: ``augment.view_ids`` of the crop and flip.
    """

    samples: np.ndarray
    views: np.ndarray


@dataclass(frozen=True)
class Batch:
    """Normalised images, labels, the samples' dataset indices, their augmentation and views (if any)."""

    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    augment: AugmentParams | None = None
    views: Views | None = None


class BatchSource(ABC):
    """A split as batches read it: labels, normalisation statistics and device, and (``images_of``) the
    uint8 images of chunks of its positions."""

    def __init__(self, labels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device):
        self.labels = labels.to(device)
        self.mean = torch.tensor(mean, device=device)
        self.std = torch.tensor(std, device=device)
        self.device = device

    def __len__(self) -> int:
        return len(self.labels)

    @abstractmethod
    def images_of(self, chunks: list[torch.Tensor], augment: EpochAugment | None = None) -> Iterator[torch.Tensor]:
        """The uint8 images of each chunk of positions, in order, on the device; augmented by ``augment``
        (chunk by chunk) when given."""


class DeviceSplit(BatchSource):
    """A split moved once to ``device``, with the normalisation statistics beside it."""

    def __init__(self, split: Split, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> None:
        super().__init__(split.labels, mean, std, device)
        self.images = split.images.to(device)

    def images_of(self, chunks: list[torch.Tensor], augment: EpochAugment | None = None) -> Iterator[torch.Tensor]:
        if augment is not None and augment.resized is not None:
            raise ValueError("random_resized_crop reads the original images: stream the split (data.loader)")
        for at, chunk in enumerate(chunks):
            images = self.images[chunk.to(self.device)]
            if augment is not None:
                params = augment.params[at]
                on_device = AugmentParams(params.offsets.to(self.device), params.flips.to(self.device))
                images = apply_augment(images, on_device, augment.padding)
            yield images


def epoch_shard(size: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """This rank's share of the epoch's permutation (equal length on every rank)."""
    generator = torch.Generator().manual_seed(_mix(seed, epoch))
    order = torch.randperm(size, generator=generator)
    per_rank = size // world_size
    return order[: per_rank * world_size][rank::world_size]


def train_batches(
    split: BatchSource,
    batch_size: int,
    epoch: int,
    seed: int,
    padding: int,
    flip: bool,
    rank: int = 0,
    world_size: int = 1,
    resized: ResizedCrops | None = None,
) -> Iterator[Batch]:
    """Shuffled, augmented batches of this rank's shard; the last partial batch is dropped.

    Indices and augmentation parameters are drawn on the host, the whole epoch's up front, so the host
    knows every batch's views without waiting for the device, CPU and GPU runs see the same views, and a
    streamed split can crop and flip while decoding.
    """
    shard = epoch_shard(len(split), epoch, seed, rank, world_size)
    generator = torch.Generator().manual_seed(_mix(seed, epoch, rank + 1))
    cpu = torch.device("cpu")
    chunks = [shard[start : start + batch_size] for start in range(0, len(shard) - batch_size + 1, batch_size)]
    augments = [sample_augment(len(chunk), padding, flip, generator, cpu) for chunk in chunks]
    batches = zip(chunks, augments, split.images_of(chunks, EpochAugment(augments, padding, resized)), strict=True)
    for index, params, images in batches:
        view = view_ids(params, padding, flip)
        if resized is not None:  # the crop is the epoch's (of the cycle's); only the flip is drawn here
            view = view + resized.view * view_count(padding, flip)
        views = Views(index.numpy(), view.numpy())
        index = index.to(split.device)
        on_device = AugmentParams(params.offsets.to(split.device), params.flips.to(split.device))
        yield Batch(normalize(images, split.mean, split.std), split.labels[index], index, on_device, views)


def eval_batches(split: BatchSource, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
    """Every sample exactly once across ranks (contiguous shards), without augmentation."""
    bounds = torch.linspace(0, len(split), world_size + 1).long().tolist()
    chunks = [
        torch.arange(start, min(start + batch_size, bounds[rank + 1]))
        for start in range(bounds[rank], bounds[rank + 1], batch_size)
    ]
    for index, images in zip(chunks, split.images_of(chunks), strict=True):
        index = index.to(split.device)
        yield Batch(normalize(images, split.mean, split.std), split.labels[index], index)


def _mix(*values: int) -> int:
    """Combine seed, epoch and rank into one generator seed (no collisions for small values)."""
    mixed = 0
    for value in values:
        mixed = (mixed * 1_000_003 + value) % (2**63)
    return mixed
