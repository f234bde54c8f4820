"""``data``: the streaming path's decode + augment throughput against a plain PyTorch ``DataLoader``.

Both read the same generated JPEG folders (224x224 and 32x32) in the same process, alternating
``rounds`` times after one warm-up pass of the stream (Ray starts its task processes once; the
``DataLoader`` starts its workers every epoch, inside its timing, as it does by default): kdray's
``train_batches`` over a ``StreamedSplit`` (decoding, crop and flip on Ray Data tasks over all the
machine's cores, normalisation of the batch in this process) and a ``DataLoader`` with one worker per
core over torchvision's ``ImageFolder`` with ``RandomCrop(padding=4)``, ``RandomHorizontalFlip``,
``ToTensor`` and ``Normalize``: the same work, images/s per core of each. With a CIFAR-style folder
(``--data-root``), one training epoch of the student in memory and streamed is timed as well.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np
import torch
from PIL import Image

from kdray.bench.options import BenchOptions
from kdray.bench.training import engine_epoch
from kdray.data import Dataset, load_dataset, on_device, train_batches
from kdray.distributed import local_context
from kdray.resolve import load_config
from kdray.schema import ExperimentConfig

FOLDERS = ((224, 2048), (32, 8192))  # side, images


def measure_data(options: BenchOptions) -> dict:
    """Images/s per core of the streaming path and of the plain loader at each size; their ratio."""
    from kdray.data.raydata import connect  # lazy: Ray Data costs the other measurements seconds to import

    connect()
    cores = os.cpu_count() or 1
    result: dict = {"cores": cores, "target": "stream_over_plain >= 1.0 at each size"}
    with tempfile.TemporaryDirectory() as scratch:
        for side, count in FOLDERS:
            root = write_jpegs(Path(scratch) / f"jpeg{side}", side, count)
            cfg = folder_config(root, Path(scratch) / "cache", options, "data.loader=stream")
            started = time.perf_counter()
            data = load_dataset(cfg.data)
            scan_s = time.perf_counter() - started
            stream, plain = [], []
            stream_epoch_rate(cfg, data, options.batch_size)  # warm-up: Ray's task processes start once per session
            for _ in range(options.rounds):
                stream.append(stream_epoch_rate(cfg, data, options.batch_size))
                plain.append(plain_epoch_rate(root, data.mean, data.std, options.batch_size, cores))
            ratios = [s / p for s, p in zip(stream, plain, strict=True)]
            result[f"jpeg{side}"] = {
                "images": len(data.train),
                "scan_s": round(scan_s, 2),
                "stream_images_per_s_per_core": round(median(stream) / cores, 1),
                "plain_images_per_s_per_core": round(median(plain) / cores, 1),
                "stream_over_plain": round(median(ratios), 3),
                "rounds": {"stream": [round(r, 1) for r in stream], "plain": [round(r, 1) for r in plain]},
            }
    if options.data_root:
        result["epoch"] = epoch_times(Path(options.data_root), options)
    return result


def write_jpegs(root: Path, side: int, count: int, classes: int = 10) -> Path:
    """``count`` JPEGs of ``side`` x ``side`` in ``classes`` class folders of ``root/train``: smooth random
    images (noise at an eighth of the size, upsampled), whose files are photo-sized, not noise-sized."""
    rng = np.random.default_rng(0)
    for index in range(count):
        path = root / "train" / f"class{index % classes}" / f"{index}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (max(2, side // 8), max(2, side // 8), 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((side, side), Image.BILINEAR).save(path, quality=90)
    return root


def folder_config(root: Path, cache: Path, options: BenchOptions, *overrides: str) -> ExperimentConfig:
    return load_config(
        None,
        [
            "data.name=imagefolder", f"data.root={root}", f"data.cache_dir={cache}", f"student.name={options.student}",
            f"train.batch_size={options.batch_size}", "train.epochs=1", "method.name=none", *overrides,
        ],
    )  # fmt: skip


def stream_epoch_rate(cfg: ExperimentConfig, data: Dataset, batch_size: int) -> float:
    """Images/s of one pass of ``train_batches`` over the streamed training split (nothing trains)."""
    augment = cfg.data.augment
    source = on_device(data.train, data.mean, data.std, torch.device("cpu"), cfg.data)
    started, images = time.perf_counter(), 0
    for batch in train_batches(source, batch_size, 0, 0, augment.padding, augment.flip):
        images += len(batch.labels)
    return images / (time.perf_counter() - started)


def plain_epoch_rate(
    root: Path, mean: tuple[float, ...], std: tuple[float, ...], batch_size: int, workers: int
) -> float:
    """Images/s of one epoch of a ``DataLoader`` with ``workers`` processes and torchvision's transforms."""
    from torchvision import datasets, transforms

    side = Image.open(next((root / "train").rglob("*.jpg"))).size[0]
    transform = transforms.Compose(
        [
            transforms.RandomCrop(side, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    loader = torch.utils.data.DataLoader(
        datasets.ImageFolder(str(root / "train"), transform=transform),
        batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
    )  # fmt: skip
    started, images = time.perf_counter(), 0
    for batch, _labels in loader:
        images += len(batch)
    return images / (time.perf_counter() - started)


def epoch_times(root: Path, options: BenchOptions) -> dict:
    """Seconds of one training epoch of the student in memory and streamed (in this process; evaluation
    outside the timer), on an image folder the user gives (e.g. CIFAR-10 as JPEGs)."""
    ctx = local_context(options.device == "cuda")
    times = {}
    with tempfile.TemporaryDirectory() as scratch:
        for loader in ("memory", "stream"):
            cfg = folder_config(root, Path(scratch), options, f"data.loader={loader}")
            data = load_dataset(cfg.data)
            images = len(data.train) // options.batch_size * options.batch_size
            times[f"{loader}_epoch_s"] = round(images / engine_epoch(cfg, data, [], ctx)["images_per_s"], 1)
    times["stream_over_memory"] = round(times["stream_epoch_s"] / times["memory_epoch_s"], 3)
    return times
