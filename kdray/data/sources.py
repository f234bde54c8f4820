"""Dataset sources: each reads one kind of data from disk into uint8 splits.

A source returns ``RawData`` (whatever splits the data ships with); ``kdray.data.load_dataset``
then carves the validation split, subsets and normalises, the same way for every source.
"""

from __future__ import annotations

import importlib.util
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdray.data.imagefolder import load_image_folder, measure_folder
from kdray.data.splits import DataError, FileSplit, Split, stratified_split
from kdray.registry import Registry
from kdray.schema import DataConfig


@dataclass(frozen=True)
class RawData:
    """Splits as a source provides them; ``val``/``test`` are None when the data has none."""

    classes: list[str]
    train: Split | FileSplit
    val: Split | FileSplit | None = None
    test: Split | FileSplit | None = None
    skipped: int = 0  # unreadable images left out (data.bad_images=skip)


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: how to load it, what it needs, and its augmentation defaults."""

    load: Callable[[Path | None, DataConfig], RawData]  # data.root (resolved), the data section
    description: str
    needs_root: bool
    padding: int
    flip: bool
    check_root: Callable[[Path, bool], str | None] = lambda root, download: None
    measure: Callable[[Path, int | None], tuple[int, int] | None] | None = None  # images, side: for data.loader=auto
    stream: Callable[[Path, DataConfig], RawData] | None = None  # how a folder is streamed, if it can be


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def digits_file() -> Path:
    """scikit-learn's bundled ``digits.csv.gz``, found without importing scikit-learn.

    ``sklearn.datasets.load_digits`` reads this one file, but importing ``sklearn.datasets`` costs 1.3-2.5 s of
    CPU (it pulls in scipy.stats), paid by every process that loads the embedded default: the driver, each
    trial and each Ray Train worker. The file is the same bytes; tests/test_data.py checks it against
    ``load_digits``."""
    spec = importlib.util.find_spec("sklearn")  # a dependency of kdray: always installed
    assert spec is not None and spec.submodule_search_locations is not None
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"


def _digits(root: Path | None, cfg: DataConfig) -> RawData:
    """scikit-learn's bundled 8x8 digits (1,797 images, values 0..16) scaled to uint8.

    It has no official test split, so a fixed stratified 20% (seed 0) is kdray's test split for it.
    """
    table = np.loadtxt(digits_file(), delimiter=",")  # 64 pixel columns, then the label
    images = np.rint(table[:, :-1].reshape(-1, 1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
    labels = table[:, -1].astype(np.int64)
    full = Split(torch.from_numpy(images), torch.from_numpy(labels))
    train, test = stratified_split(full, 0.2, seed=0)
    return RawData([str(c) for c in range(10)], train, test=test)


DATASETS.add(
    "digits",
    DatasetSpec(
        _digits,
        "scikit-learn's bundled 8x8 handwritten digits, 10 classes, no download (the embedded default)",
        needs_root=False,
        padding=1,
        flip=False,
    ),
)


def _torchvision_cifar(class_name: str) -> type:
    """torchvision's ``CIFAR10``/``CIFAR100``, imported on first use: importing torchvision costs ~1.6 s
    on a 2-core machine, which a process that never reads CIFAR (``kdray validate``, a digits or
    image-folder run) need not pay."""
    import torchvision.datasets

    return getattr(torchvision.datasets, class_name)


def _cifar(class_name: str) -> Callable[[Path | None, DataConfig], RawData]:
    """Reader for torchvision's CIFAR pickle layout; torchvision itself downloads and verifies it."""

    def load(root: Path | None, cfg: DataConfig) -> RawData:
        assert root is not None
        variant = _torchvision_cifar(class_name)
        if cfg.download:
            variant(str(root), train=True, download=True)  # fetches and checks the archive's MD5
        folder = root / variant.base_folder
        with open(folder / variant.meta["filename"], "rb") as handle:
            classes = list(pickle.load(handle, encoding="latin1")[variant.meta["key"]])
        splits = []
        for files in (variant.train_list, variant.test_list):
            images, labels = [], []
            for name, _md5 in files:
                path = folder / name
                try:
                    with open(path, "rb") as handle:
                        entry = pickle.load(handle, encoding="latin1")
                    images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                    labels.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
                except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as error:
                    raise DataError(f"{path}: not a readable CIFAR batch ({error})") from None
            split = Split(torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64))
            split.check_labels(len(classes), f"{folder} ({', '.join(name for name, _ in files)})")
            splits.append(split)
        return RawData(classes, splits[0], test=splits[1])

    return load


def _cifar_root_check(class_name: str) -> Callable[[Path, bool], str | None]:
    def check(root: Path, download: bool) -> str | None:
        folder = _torchvision_cifar(class_name).base_folder
        if download or (root / folder).is_dir():
            return None
        return f"no {folder}/ under {root}; set data.download=true to fetch it there"

    return check


def _register_cifar() -> None:
    for name, class_name, classes in (("cifar10", "CIFAR10", 10), ("cifar100", "CIFAR100", 100)):
        DATASETS.add(
            name,
            DatasetSpec(
                _cifar(class_name),
                f"CIFAR-{classes} through torchvision's format (data.root; data.download=true fetches it)",
                needs_root=True,
                padding=4,
                flip=True,
                check_root=_cifar_root_check(class_name),
            ),
        )


_register_cifar()


def _imagefolder(root: Path | None, cfg: DataConfig) -> RawData:
    assert root is not None
    skip = cfg.bad_images == "skip"
    folder = load_image_folder(root, Path(cfg.cache_dir), cfg.image_size, skip, cfg.augment.eval_crop)
    return RawData(folder.classes, folder.train, val=folder.val, test=folder.test, skipped=folder.skipped)


def _streamed_folder(root: Path, cfg: DataConfig) -> RawData:
    from kdray.data.scan import stream_folder  # Ray Data is imported only by runs that stream

    folder = stream_folder(root, Path(cfg.cache_dir), cfg.image_size, cfg.bad_images, cfg.augment.eval_crop)
    splits = folder.splits
    return RawData(folder.classes, splits["train"], splits.get("val"), splits.get("test"), folder.skipped)


def _measure_folder(root: Path, image_size: int | None) -> tuple[int, int] | None:
    """Images and side of a folder; None for an archive, which is read whole (it cannot be streamed)."""
    return None if root.is_file() else measure_folder(root, image_size)


DATASETS.add(
    "imagefolder",
    DatasetSpec(
        _imagefolder,
        "a folder or .tar.gz with train/ and optional val|valid/ and test/ class folders "
        "(CIFAR-10 JPEGs, CINIC-10, Tiny-ImageNet, ImageNet; a folder can be streamed: data.loader)",
        needs_root=True,
        padding=4,
        flip=True,
        measure=_measure_folder,
        stream=_streamed_folder,
    ),
)
