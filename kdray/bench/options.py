"""What one ``kdray bench`` run measures with (sizes, device, rounds) and the random data it measures on."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kdray.data import Dataset, Split

MEASUREMENTS = ("step", "cache", "search", "trials", "data")


@dataclass(frozen=True)
class BenchOptions:
    teacher: str = "resnet56"
    student: str = "resnet8"
    batch_size: int = 128
    device: str = "cpu"
    threads: int | None = None
    steps: int = 8  # training steps per epoch in ``step`` and ``cache``
    rounds: int = 10  # alternations of kdray and the hand-written loop in ``step``
    image_size: int = 32
    classes: int = 10
    search_trials: int = 8
    overrides: tuple[str, ...] = field(default_factory=tuple)  # config overrides of ``search`` and ``trials``
    data_root: str | None = None  # an image folder for ``data``'s memory-vs-stream epoch


def synthetic_dataset(images: int, options: BenchOptions, seed: int = 0) -> Dataset:
    """Random uint8 RGB images in memory (CIFAR-shaped by default), and a small validation split."""
    generator = torch.Generator().manual_seed(seed)
    size, classes = options.image_size, options.classes

    def split(count: int) -> Split:
        pixels = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)
        return Split(pixels, torch.randint(0, classes, (count,), generator=generator))

    names = [str(label) for label in range(classes)]
    return Dataset("synthetic", names, split(images), split(options.batch_size), None, (0.5,) * 3, (0.25,) * 3)
