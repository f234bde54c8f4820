"""Image folders (a directory or a .tar.gz of one), decoded once into a uint8 cache.

Layout: ``train/<class>/...image`` and optionally ``val/`` (or ``valid/``) and ``test/`` with the same
class folders; this covers CIFAR-10 as JPEGs and CINIC-10. Tiny-ImageNet's ``val/images`` with
``val/val_annotations.txt`` is read through the annotations; its unlabelled ``test/images`` is skipped.
Archives are read in one streaming pass without extracting. With ``data.image_size`` every image is
resized while decoding (shorter side to the size, then the centre square), so folders of mixed sizes
load; without it every image must have one square size. The memory the decoded splits will take is
computed from the file count before decoding, and a folder that would not fit is refused with the number.
Decoded splits are cached as ``.npy`` under a key made of the path, the image size and every file's
size and modification time, so a second load takes seconds and any change to the data invalidates the cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import zlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from kdray.data.splits import Split
from kdray.images import DataError, decode_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "test": "test"}
ANNOTATIONS = "val_annotations.txt"
CACHE_VERSION = 2


@dataclass(frozen=True)
class ImageFolderData:
    classes: list[str]
    train: Split
    val: Split | None
    test: Split | None
    skipped: int = 0  # unreadable images left out (skip_bad)


@dataclass
class _Entry:
    """One file of the folder: where it sits and how to read its bytes."""

    source: str  # a path a person can find: the file, or "archive.tar.gz:member"
    split: str
    rest: tuple[str, ...]  # path parts below the split folder
    read: object  # zero-argument callable returning bytes


def load_image_folder(
    root: Path, cache_dir: Path, image_size: int | None = None, skip_bad: bool = False, crop: float = 1.0
) -> ImageFolderData:
    """Load ``root`` (a folder or an archive), from the decoded cache when it is current; ``image_size``
    resizes every image to that square size (the centre ``crop`` of it: ``resize_square``); ``skip_bad``
    leaves out (and counts) images that do not decode instead of refusing the folder."""
    root = root.expanduser().resolve()
    if not root.exists():
        raise DataError(f"{root}: no such file or folder")
    cached = (
        cache_dir / "imagefolder" / folder_signature(root, image_size, crop, f"{CACHE_VERSION}{'-skip' * skip_bad}")
    )
    if (cached / "meta.json").is_file():
        return _read_cache(cached)
    data = _decode(root, image_size, skip_bad, crop)
    _write_cache(cached, data)
    return data


def folder_signature(root: Path, image_size: int | None, crop: float, version: int | str) -> str:
    """A key that changes with the path, the decoded size and centre crop, the cache format ``version`` and any
    file's size or modification time."""
    digest = hashlib.blake2b(f"{version}:{root}:{image_size}:{crop}".encode(), digest_size=16)
    if root.is_file():
        stat = root.stat()
        digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    else:
        for directory, folders, files in sorted(os.walk(root)):
            folders.sort()
            for name in sorted(files):
                stat = os.stat(os.path.join(directory, name))
                digest.update(f"{os.path.relpath(directory, root)}/{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def _entries(root: Path) -> Iterator[_Entry | tuple[str, str, tuple[str, ...]]]:
    """Yield image entries, and ``("dir", split, rest)`` for every folder (to find empty classes)."""
    if root.is_file():
        yield from _archive_entries(root)
        return
    for directory, folders, files in os.walk(root):
        folders.sort()
        located = _locate(Path(directory).relative_to(root).parts)
        if located is None:
            continue
        split, rest = located
        yield ("dir", split, rest)
        for name in sorted(files):
            path = Path(directory) / name
            yield _Entry(str(path), split, (*rest, name), path.read_bytes)


def _archive_entries(root: Path) -> Iterator[_Entry | tuple[str, str, tuple[str, ...]]]:
    """``_entries`` of a tar archive, read to its end: a damaged or truncated one is a one-line DataError."""
    try:
        archive = tarfile.open(root, "r:*")  # noqa: SIM115 (closed by the with below)
    except (tarfile.TarError, OSError) as error:
        raise DataError(f"{root}: not a readable folder or tar archive ({error})") from None
    read = 0
    with archive:
        try:
            for member in archive:
                located = _locate(PurePosixPath(member.name).parts)
                if located is None:
                    continue
                split, rest = located
                if member.isdir():
                    yield ("dir", split, rest)
                elif member.isfile():
                    payload = archive.extractfile(member).read()  # type: ignore[union-attr]
                    read += 1
                    yield _Entry(f"{root}:{member.name}", split, rest, lambda payload=payload: payload)
        except (tarfile.TarError, EOFError, zlib.error, OSError) as error:  # a truncated or damaged archive
            raise DataError(
                f"{root}: the archive is damaged or ends early after {read} files "
                f"({type(error).__name__}: {error}); copy or download it again"
            ) from None


def _locate(parts: tuple[str, ...]) -> tuple[str, tuple[str, ...]] | None:
    """Find the split folder in a path (the archive may wrap everything in a top folder)."""
    for index, part in enumerate(parts):
        if part in SPLIT_NAMES:
            return SPLIT_NAMES[part], tuple(parts[index + 1 :])
    return None


def _collect(root: Path) -> tuple[dict[str, list[_Entry]], dict[str, set[str]], dict[str, dict[str, str]]]:
    """Image files and class folders by split, and Tiny-ImageNet-style annotations by split."""
    files: dict[str, list[_Entry]] = defaultdict(list)
    folders: dict[str, set[str]] = defaultdict(set)
    annotations: dict[str, dict[str, str]] = {}
    for entry in _entries(root):
        if isinstance(entry, tuple):
            _, split, rest = entry
            if len(rest) == 1:
                folders[split].add(rest[0])
        elif entry.rest and entry.rest[-1] == ANNOTATIONS:
            text = entry.read().decode()  # type: ignore[operator]
            annotations[entry.split] = {line.split("\t")[0]: line.split("\t")[1] for line in text.splitlines() if line}
        elif PurePosixPath(entry.rest[-1]).suffix.lower() in IMAGE_SUFFIXES and len(entry.rest) >= 2:
            files[entry.split].append(entry)
    return files, folders, annotations


@dataclass(frozen=True)
class FolderIndex:
    """The labelled image files of a folder, by split (``train`` always; ``val``/``test`` when labelled)."""

    classes: list[str]
    files: dict[str, list[_Entry]]
    labels: dict[str, list[int]]

    @property
    def count(self) -> int:
        return sum(len(entries) for entries in self.files.values())


def index_folder(root: Path) -> FolderIndex:
    """Find and label every image of ``root``, refusing empty or mismatched class folders by name."""
    files, folders, annotations = _collect(root)
    if not files["train"]:
        raise DataError(f"{root}: no train/<class>/<image> files found")
    classes = sorted({entry.rest[0] for entry in files["train"]})
    for folder in sorted(folders["train"] - set(classes)):
        raise DataError(f"{root}: class folder train/{folder} holds no images")
    labelled: dict[str, list[_Entry]] = {}
    labels: dict[str, list[int]] = {}
    for split in ("train", "val", "test"):
        if files[split]:
            found = _labels(files[split], classes, annotations.get(split) if split != "train" else None)
            if found is not None:
                labelled[split], labels[split] = files[split], found
    return FolderIndex(classes, labelled, labels)


def measure_folder(root: Path, image_size: int | None) -> tuple[int, int]:
    """How many labelled images ``root`` holds and the side they decode to (from the first image's header
    when ``image_size`` is not set): what deciding between memory and streaming needs."""
    index = index_folder(root)
    return index.count, image_size or _side(index.files["train"][0])


def _decode(root: Path, image_size: int | None, skip_bad: bool, crop: float) -> ImageFolderData:
    index = index_folder(root)
    check_memory(index.count, image_size or _side(index.files["train"][0]), str(root))
    classes = index.classes
    splits: dict[str, Split | None] = {"val": None, "test": None}
    decoded, kept, failures = {}, {}, []
    for split, entries in index.files.items():
        decoded[split], kept[split] = _decode_split(entries, image_size, crop, failures)
    if failures and not skip_bad:
        raise DataError(
            f"{failures[0]} ({len(failures)} of {index.count} images cannot be read; set data.bad_images=skip to "
            "train without them)"
        )
    if failures:
        log.warning("data.bad_images=skip: left out %d unreadable images, the first %s", len(failures), failures[0])
    _check_sizes(decoded)
    channels = max(images.shape[1] for images in decoded.values())
    for name, images in decoded.items():
        if images.shape[1] != channels:  # a grey split beside colour splits
            images = np.repeat(images, channels, axis=1)
        labels = np.asarray(index.labels[name], dtype=np.int64)[kept[name]]
        splits[name] = Split(torch.from_numpy(images), torch.from_numpy(labels))
    assert splits.get("train") is not None
    return ImageFolderData(classes, splits["train"], splits["val"], splits["test"], len(failures))  # type: ignore[arg-type]


def _labels(entries: list[_Entry], classes: list[str], annotated: dict[str, str] | None) -> list[int] | None:
    """Each file's class index; None for an unlabelled split (Tiny-ImageNet's test/images)."""
    index = {name: i for i, name in enumerate(classes)}
    labels = []
    for entry in entries:
        if annotated is not None:
            wnid = annotated.get(entry.rest[-1])
            if wnid is None:
                raise DataError(f"{entry.source}: not listed in {entry.split}/{ANNOTATIONS}")
        elif entry.rest[0] == "images" and "images" not in index:
            log.info("skipping unlabelled %s/images (no %s)", entry.split, ANNOTATIONS)
            return None
        else:
            wnid = entry.rest[0]
        if wnid not in index:
            raise DataError(f"{entry.source}: class '{wnid}' is not one of the {len(classes)} train classes")
        labels.append(index[wnid])
    return labels


def _decode_split(
    entries: list[_Entry], image_size: int | None, crop: float, failures: list[str]
) -> tuple[np.ndarray, list[int]]:
    """Decode one split to uint8 [N, C, H, W] (C = 1 when every image is grey), and the rows that decoded;
    each image that does not decode adds its error to ``failures``."""
    pictures, kept = [], []
    for row, entry in enumerate(entries):
        try:
            pictures.append(_read_image(entry, image_size, crop))
        except DataError as error:
            failures.append(str(error))
            continue
        kept.append(row)
    if not pictures:
        raise DataError(f"{entries[0].source}: no image of its split decodes ({failures[-1]})")
    entries = [entries[row] for row in kept]
    first = pictures[0].shape[:2]
    for entry, picture in zip(entries, pictures, strict=True):
        if picture.shape[:2] != first:
            raise DataError(
                f"{entry.source}: image is {_size(picture)} but {entries[0].source} is {_size(pictures[0])}; "
                "set data.image_size to resize every image to one size"
            )
    if first[0] != first[1]:
        raise DataError(
            f"{entries[0].source}: image is {_size(pictures[0])}; kdray's models need square images: "
            "set data.image_size"
        )
    if all(picture.ndim == 2 for picture in pictures):
        stacked = np.stack(pictures)[:, None]
    else:
        colour = [p if p.ndim == 3 else np.repeat(p[:, :, None], 3, axis=2) for p in pictures]
        stacked = np.stack(colour).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(stacked), kept


def _size(picture: np.ndarray) -> str:
    return f"{picture.shape[1]}x{picture.shape[0]}"


def _read_image(entry: _Entry, image_size: int | None = None, crop: float = 1.0) -> np.ndarray:
    try:
        payload = entry.read()  # type: ignore[operator]
    except OSError as error:
        raise DataError(f"{entry.source}: cannot read ({error})") from None
    return decode_image(payload, entry.source, image_size, crop)


def _side(entry: _Entry) -> int:
    """The longer side of one image (read from its header): the size estimate of a folder kept at its size."""
    try:
        with Image.open(io.BytesIO(entry.read())) as image:  # type: ignore[operator]
            return max(image.size)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"{entry.source}: cannot decode image ({error})") from None


def available_memory() -> int:
    """Bytes this machine can still give (MemAvailable; the physical size where /proc is missing)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(images: int, side: int, source: str, channels: int = 3) -> None:
    """Refuse data whose decoded uint8 splits (held twice while stacking) would not fit in memory."""
    needed = 2 * images * channels * side * side
    free = available_memory()
    if needed > free:
        raise DataError(
            f"{source}: {images} images at {side}x{side} need {needed / 2**30:.1f} GiB to decode and this machine has "
            f"{free / 2**30:.1f} GiB available; lower data.image_size or data.limit_train"
        )


def _check_sizes(decoded: dict[str, np.ndarray]) -> None:
    shapes = {name: images.shape[2:] for name, images in decoded.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {h}x{w}" for name, (h, w) in shapes.items())
        raise DataError(f"splits have different image sizes ({listed}); every image must have the same size")


def _write_cache(folder: Path, data: ImageFolderData) -> None:
    """Write next to the final place, then rename: readers never see a half-written cache."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".partial-"))
    try:
        present = {}
        for name in ("train", "val", "test"):
            split = getattr(data, name)
            if split is not None:
                np.save(staging / f"{name}_images.npy", split.images.numpy())
                np.save(staging / f"{name}_labels.npy", split.labels.numpy())
                present[name] = len(split)
        meta = {"classes": data.classes, "splits": present, "skipped": data.skipped}
        (staging / "meta.json").write_text(json.dumps(meta))
        os.replace(staging, folder)
    except OSError:
        if (folder / "meta.json").is_file():  # another process cached the same folder first
            shutil.rmtree(staging, ignore_errors=True)
            return
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _read_cache(folder: Path) -> ImageFolderData:
    meta = json.loads((folder / "meta.json").read_text())
    splits: dict[str, Split | None] = {"train": None, "val": None, "test": None}
    for name in meta["splits"]:
        images = torch.from_numpy(np.load(folder / f"{name}_images.npy"))
        labels = torch.from_numpy(np.load(folder / f"{name}_labels.npy"))
        splits[name] = Split(images, labels)
    assert splits["train"] is not None
    return ImageFolderData(meta["classes"], splits["train"], splits["val"], splits["test"], meta.get("skipped", 0))
