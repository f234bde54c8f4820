"""Datasets as in-memory uint8 tensors: registry, loading, validation split, batches."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kdray.data.batches import Batch, DeviceSplit, Views, eval_batches, train_batches
from kdray.data.sources import DATASETS, DatasetSpec, RawData
from kdray.data.splits import (
    DataError,
    Dataset,
    Split,
    channel_stats,
    resize_split,
    stratified_split,
    stratified_subset,
)

if TYPE_CHECKING:
    from kdray.config import DataConfig

__all__ = [
    "DATASETS",
    "Batch",
    "DataError",
    "Dataset",
    "DatasetSpec",
    "DeviceSplit",
    "Split",
    "Views",
    "eval_batches",
    "load_dataset",
    "train_batches",
]


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load ``cfg.name`` and shape it the same way for every source.

    A validation split is carved from train (stratified, seeded) when the data ships none, so
    model selection and searches never look at the test split. Normalisation statistics are the
    training split's own.
    """
    spec = DATASETS[cfg.name]
    root = Path(cfg.root) if cfg.root else None  # absolute since validation, like every path of a config
    raw = spec.load(root, cfg.download, Path(cfg.cache_dir), cfg.image_size)
    if cfg.image_size is not None:  # sources that hold their data in memory resize here (image folders did)
        raw = resized(raw, cfg.image_size, cfg.name)
    train, val = raw.train, raw.val
    if val is None:
        train, val = stratified_split(train, cfg.val_fraction, cfg.split_seed)
    if cfg.limit_train is not None:
        train = stratified_subset(train, cfg.limit_train, cfg.split_seed)
    mean, std = channel_stats(train.images)
    return Dataset(cfg.name, raw.classes, train, val, raw.test, mean, std)


def resized(raw: RawData, size: int, source: str) -> RawData:
    """``raw`` with every split at ``size`` x ``size`` (antialiased bilinear), checked against free memory first."""
    from kdray.data.imagefolder import check_memory

    splits = [split for split in (raw.train, raw.val, raw.test) if split is not None]
    if all(split.images.shape[-1] == size and split.images.shape[-2] == size for split in splits):
        return raw
    check_memory(sum(len(split) for split in splits), size, source, raw.train.images.shape[1])
    return RawData(
        raw.classes,
        *(resize_split(split, size) if split is not None else None for split in (raw.train, raw.val, raw.test)),
    )
