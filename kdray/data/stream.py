"""Streamed splits: image files decoded batch by batch on Ray Data's CPU tasks, uint8 to the device.

A ``StreamedSplit`` answers ``images_of`` the way a ``DeviceSplit`` does (the uint8 images of each
chunk of indices, in order, with the crops and flips ``kdray.data.batches`` drew for them), so both
share one permutation, one sharding over the workers and one draw of augmentations: a streamed epoch
holds the same images in the same batches as the in-memory one, and a run repeats from its seed. The
crop and flip are applied in the decoding tasks, off the training process. Each Ray Train worker asks
Ray Data for its own shard only, so no worker ever holds more than a few batches of images; the
decoding runs on whichever nodes have CPUs free (preprocessing nodes included).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict

import pyarrow as pa
import torch

from kdray.data.augment import EpochAugment
from kdray.data.batches import BatchSource
from kdray.data.raydata import ordered_map
from kdray.data.splits import FileSplit
from kdray.images import decode_batch

TASK_BYTES = 2**25  # decoded bytes one task aims at: ~220 images at 224x224, 2,048 (the cap) at 32x32


def rows_per_task(count: int, image_shape: tuple[int, int, int]) -> int:
    """Images per decoding task: about ``TASK_BYTES`` of output (a task has a fixed cost of some
    milliseconds, which 32x32 images amortise only by the thousand), 16 to 2,048, and small enough that
    ``count`` images make at least four tasks to run side by side."""
    image_bytes = image_shape[0] * image_shape[1] * image_shape[2]
    return max(1, min(2048, max(16, TASK_BYTES // image_bytes), math.ceil(count / 4)))


class StreamedSplit(BatchSource):
    """A ``FileSplit`` with the normalisation statistics and device that batches need."""

    def __init__(
        self,
        split: FileSplit,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device,
        cpus_per_task: float = 1.0,
        crop: float = 1.0,
    ) -> None:
        super().__init__(split.labels, mean, std, device)
        self.split = split
        self.cpus_per_task = cpus_per_task
        self.crop = crop

    def images_of(self, chunks: list[torch.Tensor], augment: EpochAugment | None = None) -> Iterator[torch.Tensor]:
        """The uint8 [n, C, H, W] images of each chunk of split positions, on the device, in order; cropped
        and flipped while decoding (on Ray Data's tasks, not in the training process) when ``augment`` is given."""
        if not chunks:
            return
        order = torch.cat(chunks).numpy()
        columns = {"path": self.split.paths.take(pa.array(order))}
        resized = augment.resized if augment is not None else None
        if augment is not None:
            offsets = torch.cat([params.offsets for params in augment.params]).numpy()
            flips = torch.cat([params.flips for params in augment.params]).numpy()
            columns |= {"row": offsets[:, 0], "column": offsets[:, 1], "flip": flips}
        if resized is not None:
            columns["position"] = order
        table = pa.table(columns)
        kwargs = {
            "image_size": self.split.image_shape[-1], "channels": self.split.image_shape[0],
            "padding": augment.padding if augment is not None else 0, "crop": self.crop,
            "resized": None if resized is None else asdict(resized),
        }  # fmt: skip
        rows = rows_per_task(len(table), self.split.image_shape)
        batches = ordered_map(table, decode_batch, kwargs, len(chunks[0]), rows, self.cpus_per_task)
        for batch in batches:  # Ray hands out read-only views: a copy makes a tensor torch may write
            yield torch.from_numpy(batch["image"].copy()).to(self.device, non_blocking=True)
