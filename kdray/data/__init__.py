"""Datasets: registry, loading (in memory or streamed), validation split, batches."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from kdray.data.batches import Batch, BatchSource, DeviceSplit, Views, eval_batches, train_batches
from kdray.data.imagefolder import available_memory, check_memory
from kdray.data.sources import DATASETS, DatasetSpec, RawData
from kdray.data.splits import (
    DataError,
    Dataset,
    FileSplit,
    Split,
    channel_stats,
    resize_split,
    stratified_split,
    stratified_subset,
)
from kdray.schema import DataConfig

__all__ = [
    "DATASETS",
    "Batch",
    "BatchSource",
    "DataError",
    "Dataset",
    "DatasetSpec",
    "DeviceSplit",
    "FileSplit",
    "Split",
    "Views",
    "eval_batches",
    "load_dataset",
    "on_device",
    "train_batches",
]

log = logging.getLogger(__name__)


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load ``cfg.name`` and shape it the same way for every source.

    A validation split is carved from train (stratified, seeded) when the data ships none, so
    model selection and searches never look at the test split; ``data.test_fraction`` carves a test
    split too, for data that ships only a training set. Normalisation statistics are the
    training split's own.
    """
    spec = DATASETS[cfg.name]
    root = Path(cfg.root) if cfg.root else None  # absolute since validation, like every path of a config
    if choose_loader(cfg, spec, root) == "stream":
        assert spec.stream is not None and root is not None
        raw = spec.stream(root, cfg)
    else:
        raw = spec.load(root, cfg)
    if cfg.image_size is not None and isinstance(raw.train, Split):  # in-memory sources resize here
        raw = resized(raw, cfg.image_size, cfg.name)
    train, val, test = raw.train, raw.val, raw.test
    carved = val is None
    if carved:
        train, val = stratified_split(train, cfg.val_fraction, cfg.split_seed)
    if cfg.test_fraction is not None:
        if test is not None:
            raise DataError(f"data.test_fraction: {cfg.name} has its own test split; remove data.test_fraction")
        # A share of the original train: of what the validation split left, when it was carved from train too.
        share = cfg.test_fraction / (1 - cfg.val_fraction) if carved else cfg.test_fraction
        train, test = stratified_split(train, share, cfg.split_seed + 1)
    if cfg.limit_train is not None:
        train = stratified_subset(train, cfg.limit_train, cfg.split_seed)
    mean, std = channel_stats(train)
    return Dataset(cfg.name, raw.classes, train, val, test, mean, std, raw.skipped)


def choose_loader(cfg: DataConfig, spec: DatasetSpec, root: Path | None) -> str:
    """``memory`` or ``stream`` for ``data.loader``; ``auto`` streams a folder whose decoded images would not
    fit ``data.memory_budget`` (half of the available memory when unset), and says so with the figures."""
    if cfg.loader == "memory" or spec.stream is None:
        return "memory"
    if cfg.loader == "stream":
        return "stream"
    if cfg.augment.kind == "random_resized_crop":
        log.info("data.loader=auto: random_resized_crop crops the original images: streaming from the files")
        return "stream"
    assert root is not None and spec.measure is not None
    measured = spec.measure(root, cfg.image_size)
    if measured is None:
        return "memory"
    images, side = measured
    needed = images * 3 * side * side
    budget = cfg.memory_budget * 2**30 if cfg.memory_budget is not None else available_memory() / 2
    loader = "stream" if needed > budget else "memory"
    log.info(
        "data.loader=auto: %d images at %dx%d decode to %.2f GiB, %s the %.2f GiB memory budget (%s): %s",
        images, side, side, needed / 2**30, "over" if loader == "stream" else "within", budget / 2**30,
        "data.memory_budget" if cfg.memory_budget is not None else "half of the available memory",
        "streaming from the files" if loader == "stream" else "in memory",
    )  # fmt: skip
    return loader


def on_device(
    split: Split | FileSplit, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device, cfg: DataConfig
) -> BatchSource:
    """The split as batches read it: moved to ``device`` whole, or streamed from its files."""
    if isinstance(split, FileSplit):
        from kdray.data.stream import StreamedSplit  # lazy: Ray Data is imported only by runs that stream

        return StreamedSplit(split, mean, std, device, cfg.decode_cpus, cfg.augment.eval_crop)
    return DeviceSplit(split, mean, std, device)


def resized(raw: RawData, size: int, source: str) -> RawData:
    """``raw`` with every split at ``size`` x ``size`` (antialiased bilinear), checked against free memory first."""
    splits = [split for split in (raw.train, raw.val, raw.test) if split is not None]
    if all(split.images.shape[-1] == size and split.images.shape[-2] == size for split in splits):
        return raw
    check_memory(sum(len(split) for split in splits), size, source, raw.train.images.shape[1])
    return RawData(
        raw.classes,
        *(resize_split(split, size) if split is not None else None for split in (raw.train, raw.val, raw.test)),
    )
