"""The streaming path's one pass over an image folder: every file decoded once, on Ray Data's CPU tasks.

A folder that is streamed is never decoded into a cache. One pass instead reads every file and keeps
what the rest of kdray needs of it: whether it decodes, its size, its per-channel pixel sums (the
normalisation statistics) and the digest of its decoded pixels (the dataset fingerprint). Bad files
are therefore found before any training starts: refused with the first one named, or skipped and
counted (``data.bad_images``), never a crash in the middle of an epoch. The pass is cached under
``data.cache_dir``, keyed like the in-memory cache (path, image size, every file's size and
modification time), so only the first run over a folder pays for it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from kdray.data.imagefolder import folder_signature, index_folder
from kdray.data.raydata import connect, ordered_map
from kdray.data.splits import DataError, FileSplit
from kdray.images import read_error, scan_batch

log = logging.getLogger(__name__)

SCAN_VERSION = 1
ROWS_PER_TASK = 512
FACTS = ("height", "width", "colour", "sums", "squares", "digest", "digest3")


@dataclass(frozen=True)
class StreamedFolder:
    """A folder's splits as ``FileSplit``s, and how many unreadable images were left out."""

    classes: list[str]
    splits: dict[str, FileSplit]
    skipped: int


def stream_folder(
    root: Path, cache_dir: Path, image_size: int | None, bad_images: str, crop: float = 1.0
) -> StreamedFolder:
    """Index and scan ``root`` (from the cache when current) into splits that stay in their files; each image
    is scanned as evaluation decodes it (``image_size``, centre ``crop``)."""
    root = root.expanduser().resolve()
    if root.is_file():
        raise DataError(
            f"{root}: data.loader=stream reads a folder of image files, not an archive; extract it "
            "(to storage every node reaches) and point data.root at the folder"
        )
    index = index_folder(root)
    paths = [entry.source for split in index.files for entry in index.files[split]]
    check_reachable(root, paths[0])
    labels = np.concatenate([np.asarray(index.labels[split], dtype=np.int64) for split in index.files])
    folder = cache_dir / "stream" / folder_signature(root, image_size, crop, SCAN_VERSION)
    facts = _cached_scan(root, folder, paths, image_size, crop)
    keep = _apply_policy(facts, paths, bad_images)
    shape = _image_shape(facts, keep, paths)
    digests = facts["digest3"] if shape[0] == 3 else facts["digest"]
    splits, start = {}, 0
    for name, split_entries in index.files.items():
        rows = np.arange(start, start + len(split_entries))
        start += len(split_entries)
        rows = rows[keep[rows]]
        if len(rows) == 0:
            raise DataError(f"{root}: every image of {name}/ is unreadable")
        splits[name] = FileSplit(
            pa.array([paths[row] for row in rows], type=pa.string()), torch.from_numpy(labels[rows]), shape,
            facts["sums"][rows, : shape[0]], facts["squares"][rows, : shape[0]], digests[rows],
        )  # fmt: skip
    return StreamedFolder(index.classes, splits, int((~keep).sum()))


def check_reachable(root: Path, sample: str) -> None:
    """Refuse, before any scan or training, a folder that some node of the Ray cluster cannot read at this
    path: each alive node reads the first byte of ``sample`` (a task pinned to it, asking for no CPU)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    connect()
    probe = ray.remote(read_error)
    nodes = [node for node in ray.nodes() if node["Alive"]]
    pending = [
        probe.options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote(sample)
        for node in nodes
    ]
    for node, error in zip(nodes, ray.get(pending), strict=True):
        if error is not None:
            raise DataError(
                f"{root}: node {node['NodeManagerAddress']} cannot read {sample} ({error}); streamed data must be "
                "on storage every node mounts at the same path"
            )


def _cached_scan(
    root: Path, folder: Path, paths: list[str], image_size: int | None, crop: float
) -> dict[str, np.ndarray]:
    """The per-file facts of ``paths``, read from ``folder`` or scanned and written there."""
    if (folder / "meta.json").is_file():
        with np.load(folder / "facts.npz") as stored:
            return {name: stored[name] for name in stored.files}
    started = time.perf_counter()
    facts = scan(paths, image_size, crop)
    log.info(
        "scanned %d images of %s in %.1f s (cached in %s)", len(paths), root, time.perf_counter() - started, folder
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".partial-"))
    try:
        np.savez(staging / "facts.npz", **facts)
        (staging / "meta.json").write_text(json.dumps({"root": str(root), "images": len(paths)}))
        os.replace(staging, folder)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (folder / "meta.json").is_file():  # not merely another process caching the same folder first
            raise
    return facts


def scan(paths: list[str], image_size: int | None, crop: float = 1.0) -> dict[str, np.ndarray]:
    """Decode every file once on Ray Data tasks; per file: ``FACTS`` and (``error_rows``,
    ``error_messages``) for those that do not decode."""
    table = pa.table({"path": pa.array(paths, type=pa.string())})
    kwargs = {"image_size": image_size, "crop": crop}
    parts = list(ordered_map(table, scan_batch, kwargs, 4096, ROWS_PER_TASK, 1.0))
    facts = {name: np.concatenate([part[name] for part in parts]) for name in FACTS}
    errors = np.concatenate([part["error"] for part in parts])
    failed = np.flatnonzero(errors != "")
    facts["error_rows"] = failed
    facts["error_messages"] = errors[failed].astype(str)
    return facts


def _apply_policy(facts: dict[str, np.ndarray], paths: list[str], bad_images: str) -> np.ndarray:
    """Which rows to keep: all but the unreadable ones, which ``refuse`` turns into an error instead."""
    keep = np.ones(len(paths), dtype=bool)
    failed = facts["error_rows"]
    if len(failed) == 0:
        return keep
    if bad_images == "refuse":
        raise DataError(
            f"{facts['error_messages'][0]} ({len(failed)} of {len(paths)} images cannot be read; set "
            "data.bad_images=skip to train without them)"
        )
    keep[failed] = False
    log.warning(
        "data.bad_images=skip: left out %d unreadable images, the first %s", len(failed), facts["error_messages"][0]
    )
    return keep


def _image_shape(facts: dict[str, np.ndarray], keep: np.ndarray, paths: list[str]) -> tuple[int, int, int]:
    """(channels, side, side) of the kept images: colour if any image is, one square size throughout."""
    heights, widths = facts["height"][keep], facts["width"][keep]
    kept = np.flatnonzero(keep)
    odd = np.flatnonzero((heights != heights[0]) | (widths != widths[0]))
    if len(odd):
        raise DataError(
            f"{paths[kept[odd[0]]]}: image is {widths[odd[0]]}x{heights[odd[0]]} but {paths[kept[0]]} is "
            f"{widths[0]}x{heights[0]}; set data.image_size to resize every image to one size"
        )
    if heights[0] != widths[0]:
        raise DataError(
            f"{paths[kept[0]]}: image is {widths[0]}x{heights[0]}; kdray's models need square images: "
            "set data.image_size"
        )
    return (3 if facts["colour"][keep].any() else 1, int(heights[0]), int(widths[0]))
