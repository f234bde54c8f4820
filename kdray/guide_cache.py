"""An exact cache of frozen guides' logits: one entry per (training image, augmentation view).

Why it pays: a guide (teacher, assistant, pacemaker) is frozen, and which view of which image each
step shows depends only on ``train.seed`` (batch order, crop offsets, flips), not on the method or
its hyperparameters. So every trial of a search asks a guide the same questions: the first trial
computes the answers, the others read them, and so do later searches on the same teacher and data.
Within one run a view recurs only by chance (1 in 162 per epoch for padding 4 with flips).

Why it is exact: an entry holds the guide's logits for the very tensor the engine builds (same
uint8 crop, same normalisation), from the same weights on the same kind of device, precision and
memory layout — all part of the table's key — stored in float32 unless ``guide_cache.dtype`` says
float16. A batch with missing rows runs the guide over the whole batch, the shape an uncached run
uses, so a row is computed by the same kernels whether or not the cache is on: a pass over only the
missing images would be another batch size, whose kernels can differ in the last bits. Rows written
by a run with another ``train.batch_size`` were computed at that batch shape, so reading them is
exact up to float32 rounding (about 1e-7 relative), not bit for bit. tests/test_guide_cache.py
checks that cached and uncached runs of one batch size train bit-identical students.

How it is stored: one table per key, a memory-mapped file [images, views, classes] created full of
NaN; a row is filled when none of its values is NaN. Writers of a row write the same values and each
value is written whole, so a reader sees NaN (a miss: it computes the row) or the right value, never
a torn row taken for a filled one — no locks on the hot path, for processes of one node or on a
shared POSIX file system. Tables are created, and the least recently opened ones evicted to keep the
folder within ``max_gb``, under one file lock; a table larger than the budget covers the first images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import filelock
import numpy as np
import torch
from torch import nn

from kdray.data import Views
from kdray.schema import GuideCacheConfig
from kdray.store import model_key

log = logging.getLogger(__name__)

TABLE_FORMAT = 1
_CHUNK_BYTES = 64 << 20


def weights_fingerprint(model: nn.Module) -> str:
    """Content hash of a model's parameters and buffers (the same weights give the same logits)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class OutputTable:
    """One guide's logits for every (image, view) of the first ``images`` training images."""

    def __init__(self, folder: Path, meta: dict[str, Any]) -> None:
        self.folder = folder
        self.images = meta["images"]
        shape = (self.images, meta["views"], meta["classes"])
        self.array = np.memmap(folder / "logits.bin", dtype=meta["dtype"], mode="r+", shape=shape)

    @property
    def nbytes(self) -> int:
        return self.array.nbytes

    def read(self, samples: np.ndarray, views: np.ndarray) -> np.ndarray:
        """float32 [N, classes]; rows of images outside the table or not yet filled hold NaN."""
        out = np.full((len(samples), self.array.shape[2]), np.nan, dtype=np.float32)
        covered = samples < self.images
        out[covered] = self.array[samples[covered], views[covered]]
        return out

    def write(self, samples: np.ndarray, views: np.ndarray, logits: np.ndarray) -> None:
        covered = samples < self.images
        self.array[samples[covered], views[covered]] = logits[covered]

    def flush(self) -> None:
        self.array.flush()


def open_table(
    root: Path, identity: dict[str, Any], shape: tuple[int, int, int], dtype: str, max_bytes: int
) -> OutputTable | None:
    """The table for ``identity``, created (NaN) if new; ``None`` if not even one image fits the budget."""
    images, views, classes = shape
    key = model_key({"guide_outputs": TABLE_FORMAT, **identity, "shape": list(shape), "dtype": dtype})
    folder = root / key
    root.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(root / ".lock"):
        if not (folder / "meta.json").is_file():
            row_bytes = views * classes * np.dtype(dtype).itemsize
            covered = min(images, _make_room(root, images * row_bytes, max_bytes) // row_bytes)
            if covered == 0:
                log.warning("guide_cache.max_gb is too small for one image's views; the guide is not cached")
                return None
            _create(
                root,
                folder,
                {"key": key, **identity, "images": covered, "views": views, "classes": classes, "dtype": dtype},
            )
        os.utime(folder / "meta.json")  # marks the table recently used, for eviction
        meta = json.loads((folder / "meta.json").read_text())
    return OutputTable(folder, meta)


def _tables(root: Path) -> list[Path]:
    return [entry for entry in root.iterdir() if (entry / "meta.json").is_file()]


def _make_room(root: Path, wanted: int, max_bytes: int) -> int:
    """Evict the least recently opened tables until ``wanted`` bytes fit; returns the bytes available.
    A process still using an evicted table keeps its mapping; its later writes are simply not kept."""
    tables = sorted(_tables(root), key=lambda entry: (entry / "meta.json").stat().st_mtime)
    used = sum((entry / "logits.bin").stat().st_size for entry in tables)
    while tables and used + wanted > max_bytes:
        oldest = tables.pop(0)
        used -= (oldest / "logits.bin").stat().st_size
        log.info("guide cache: evicting %s to stay within guide_cache.max_gb", oldest.name)
        shutil.rmtree(oldest, ignore_errors=True)
    return max(0, max_bytes - used)


def _create(root: Path, folder: Path, meta: dict[str, Any]) -> None:
    """Write a NaN table in a staging folder and rename it into place (readers never see it half made)."""
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{folder.name}-"))
    try:
        total = meta["images"] * meta["views"] * meta["classes"]
        chunk = np.full(max(1, _CHUNK_BYTES // np.dtype(meta["dtype"]).itemsize), np.nan, dtype=meta["dtype"])
        with open(staging / "logits.bin", "wb") as out:
            for start in range(0, total, len(chunk)):
                chunk[: total - start].tofile(out)
        (staging / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class GuideCache:
    """Where the guide-output tables of one training stage live, and what its guides see.

    ``data_identity`` names that: the dataset fingerprint, augmentation, normalisation, device kind
    and precision. ``lookup(model)`` gives one guide's lookups; its table is opened on the first one,
    so a guide that only ever sees mixed images (which carry no views) creates none.
    """

    def __init__(
        self,
        settings: GuideCacheConfig,
        folder: Path,
        data_identity: dict[str, Any],
        shape: tuple[int, int, int],
        device: torch.device,
    ) -> None:
        self.settings = settings
        self.folder = folder
        self.data_identity = data_identity
        self.shape = shape
        # On a GPU, writing computed rows back means waiting for them: do it once per epoch instead.
        self.deferred = device.type == "cuda"

    def lookup(self, model: nn.Module) -> GuideLookup:
        return GuideLookup(self, model)

    def open(self, model: nn.Module) -> OutputTable | None:
        identity = {**self.data_identity, "guide": weights_fingerprint(model)}
        max_bytes = int(self.settings.max_gb * 2**30)
        return open_table(self.folder, identity, self.shape, self.settings.dtype, max_bytes)


class GuideLookup:
    """One guide's cached logits, with the hits and misses since the last ``epoch_metrics``."""

    def __init__(self, cache: GuideCache, model: nn.Module) -> None:
        self.cache = cache
        self.model = model
        self.opened = False
        self.table: OutputTable | None = None
        self.pending: list[tuple[np.ndarray, np.ndarray, torch.Tensor]] = []
        self.hits = self.misses = 0

    def logits(
        self, images: torch.Tensor, views: Views, compute: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """float32 logits for ``images`` (the views ``views``): stored rows are read, the others computed by
        ``compute`` (one forward pass) and stored."""
        if not self.opened:
            self.table, self.opened = self.cache.open(self.model), True
        if self.table is None:
            return compute(images).float()
        cached = self.table.read(views.samples, views.views)
        missing = np.flatnonzero(np.isnan(cached).any(axis=1))
        self.hits += len(cached) - len(missing)
        self.misses += len(missing)
        result = torch.from_numpy(cached).to(images.device)
        if len(missing):
            # Missing rows are computed by a forward pass over the whole batch, the one shape an uncached
            # run uses too: a pass over only the missing images (another batch size) may take other
            # kernels and differ in the last bits (seen on Intel CPUs), so cached would not equal uncached.
            rows = torch.from_numpy(missing).to(images.device)
            computed = compute(images)[rows].float()
            if self.cache.settings.dtype == "float16":  # as a later hit would read it: cold and warm runs agree
                computed = computed.half().float()
            result[rows] = computed
            entry = (views.samples[missing], views.views[missing], computed)
            if self.cache.deferred:
                self.pending.append(entry)
            else:
                self._write(*entry)
        return result

    def _write(self, samples: np.ndarray, views: np.ndarray, logits: torch.Tensor) -> None:
        assert self.table is not None
        self.table.write(samples, views, logits.cpu().numpy())

    def flush(self) -> None:
        """Write deferred rows and push the table to disk (end of each epoch)."""
        for entry in self.pending:
            self._write(*entry)
        self.pending.clear()
        if self.table is not None:
            self.table.flush()

    def epoch_metrics(self) -> dict[str, float]:
        """Hits, misses and table bytes since the last call; nothing while no table is open."""
        if self.table is None:
            return {}
        metrics = {
            "cache/hits": float(self.hits),
            "cache/misses": float(self.misses),
            "cache/bytes": float(self.table.nbytes),
        }
        self.hits = self.misses = 0
        return metrics
