"""The model store in a folder: every trained model under a content hash of what produced it.

A model's key hashes its identity: architecture, data fingerprint and split, training recipe,
method and hyperparameters, the keys of the models that taught it, and the seed. A later run that
needs the same model (a teacher shared by many students, an assistant shared by many trials) loads
it instead of training it again. Entries are written to a staging folder and renamed into place, so
a crash or a concurrent writer never leaves a half-written model; weights load with
``weights_only=True``, which never unpickles code.

What is read back is what was written: ``meta.json`` records the SHA-256 of ``model.pt``, and every
lookup checks it (once per file version and process). An entry that fails the check (bytes changed
in place, a truncated or missing file, unreadable metadata) is moved aside into ``.quarantine/`` --
never deleted -- with a one-line warning naming the key and the file, and the lookup reports it
missing, so the stage that needs it trains it again under the entry's lock.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import filelock
import torch

from kdray.models import ModelInfo, StagedNet, build_model
from kdray.models.deploy import restandardized
from kdray.schema.storage import GUIDE_OUTPUTS_FOLDER

log = logging.getLogger(__name__)

# Part of every key: raised whenever the same identity would train another model. 2: methods draw their
# random numbers from the step's own generator instead of torch's global one.
STORE_FORMAT = 2


def model_key(identity: dict[str, Any]) -> str:
    """Content hash of an identity (a JSON-able dict); stable across runs and machines."""
    text = json.dumps({"format": STORE_FORMAT, **identity}, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


@dataclass(frozen=True)
class StoredModel:
    key: str
    path: Path
    meta: dict[str, Any]

    @property
    def weights(self) -> Path:
        return self.path / "model.pt"


_DIGESTS: dict[tuple[str, int, int, int], str] = {}  # (path, size, mtime, inode) -> SHA-256, per process


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, computed once per version of the file in this process."""
    status = path.stat()
    version = (str(path), status.st_size, status.st_mtime_ns, status.st_ino)
    if version not in _DIGESTS:
        with path.open("rb") as handle:
            _DIGESTS[version] = hashlib.file_digest(handle, "sha256").hexdigest()
    return _DIGESTS[version]


def _write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` and flush it to disk, so a rename that follows never publishes unwritten bytes."""
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def entry_problem(entry: Path) -> str | None:
    """Why the entry folder cannot be trusted (a sentence naming the file), or None if it checks out."""
    meta_file, weights = entry / "meta.json", entry / "model.pt"
    try:
        meta = json.loads(meta_file.read_text())
    except FileNotFoundError:
        return f"{meta_file} is missing"
    except (OSError, ValueError) as error:
        return f"{meta_file} is unreadable ({error})"
    if not weights.is_file():
        return f"{weights} is missing"
    recorded = meta.get("weights_sha256")
    if recorded is None:
        return f"{meta_file} records no content hash (written by an older kdray, or edited)"
    found = file_digest(weights)
    if found != recorded:
        return f"{weights} differs from what was stored (SHA-256 {found[:12]}…, recorded {recorded[:12]}…)"
    return None


_LOCKS: dict[str, filelock.FileLock] = {}


def is_key(name: str) -> bool:
    """Whether ``name`` can be an entry's folder: not empty, not a path, not hidden (``.locks``, ``.quarantine``)
    and not the guide-output cache kept in the store by default."""
    return bool(name) and not name.startswith(".") and "/" not in name and name != GUIDE_OUTPUTS_FOLDER


class ModelStore:
    """A folder of ``<key>/{model.pt, config.yaml, meta.json}`` entries, checked on every lookup."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def lock(self, key: str) -> filelock.FileLock:
        """An inter-process lock for producing entry ``key``: concurrent search trials that need the same
        teacher or assistant take it, and all but the first find the entry when they get it. (File locks
        need a file system that honours them; on a cluster, a shared POSIX file system such as NFSv4, or a
        store in a bucket, whose locks are leases: ``kdray.store.bucket``.)
        One lock object per file in a process, so it is re-entrant: a lookup under the lock may take it
        again to quarantine a damaged entry."""
        folder = self.root / ".locks"
        folder.mkdir(parents=True, exist_ok=True)
        path = str((folder / f"{key}.lock").resolve())
        if path not in _LOCKS:
            _LOCKS[path] = filelock.FileLock(path)
        return _LOCKS[path]

    def keys(self) -> list[str]:
        """Every entry's key (folders that are not hidden and not the guide-output cache), sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and is_key(p.name))

    def find(self, key: str) -> StoredModel | None:
        """The entry ``key`` if it is there and intact; a damaged entry is quarantined and reported missing."""
        if not is_key(key):  # never the store itself, its own folders or the guide-output cache
            return None
        entry = self.root / key
        if not entry.is_dir():
            return None
        if entry_problem(entry) is not None:
            self.quarantine(key)
            return None
        return StoredModel(key, entry, json.loads((entry / "meta.json").read_text()))

    def quarantine(self, key: str) -> Path | None:
        """Move a damaged entry aside into ``.quarantine/`` (under its lock, after checking it again: another
        process may have replaced it meanwhile); where it went, or None if it checked out after all."""
        entry = self.root / key
        if not is_key(key):
            return None
        with self.lock(key):
            problem = entry_problem(entry) if entry.is_dir() else None
            if problem is None:
                return None
            aside = self.root / ".quarantine" / f"{key}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            aside.parent.mkdir(parents=True, exist_ok=True)
            os.replace(entry, aside)
            (aside / "QUARANTINED.txt").write_text(problem + "\n")
        log.warning("model store: %s; entry %s moved to %s, its stage will be trained again", problem, key, aside)
        return aside

    def save(
        self, key: str, state_dict: dict[str, torch.Tensor], config_yaml: str, meta: dict[str, Any]
    ) -> StoredModel:
        """Write an entry atomically (files flushed to disk, the metadata with the weights' hash last, then one
        rename); if another writer got there first with an intact entry, keep theirs."""
        staging = self.stage_entry(key, state_dict, config_yaml, meta)
        try:
            try:
                os.replace(staging, self.root / key)
            except OSError:  # an entry is there: theirs if intact, else it is quarantined now and ours goes in
                if self.find(key) is None:
                    os.replace(staging, self.root / key)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        stored = self.find(key)
        assert stored is not None
        return stored

    def stage_entry(
        self, key: str, state_dict: dict[str, torch.Tensor], config_yaml: str, meta: dict[str, Any]
    ) -> Path:
        """A complete entry in a hidden staging folder of the store (the caller moves it into place or removes it):
        the weights, the config and, last, the metadata with the weights' SHA-256, each flushed to disk."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{key}-"))
        weights = staging / "model.pt"
        torch.save({name: tensor.detach().cpu() for name, tensor in state_dict.items()}, weights)
        with weights.open("rb+") as handle:
            os.fsync(handle.fileno())
        _write_synced(staging / "config.yaml", config_yaml.encode())
        record = {"key": key, **meta, "weights_sha256": file_digest(weights)}
        _write_synced(staging / "meta.json", json.dumps(record, indent=2, sort_keys=True).encode())
        return staging

    def problem(self, key: str) -> str | None:
        """Why entry ``key`` cannot be trusted, or None if it checks out (``kdray store verify``)."""
        return entry_problem(self.root / key)

    def meta(self, key: str) -> dict[str, Any] | None:
        """An entry's recorded metadata, unchecked (its weights are not read), or None where it is missing or
        unreadable: enough to explain a key (``kdray store why``) without reading the whole store."""
        try:
            return json.loads((self.root / key / "meta.json").read_text())
        except (OSError, ValueError):
            return None

    @property
    def location(self) -> str:
        """Where the store is, as a user names it."""
        return str(self.root)

    def load(self, key: str, info: ModelInfo) -> StagedNet:
        """Build the stored architecture and load its weights (never executes pickled code)."""
        stored = self.find(key)
        if stored is None:
            raise FileNotFoundError(f"model {key} is not in the store at {self.location}")
        spec = stored.meta["model"]
        model = build_model(
            spec["name"], replace(info, onthefly=spec.get("onthefly", False), batchnorm=spec.get("batchnorm", True))
        )
        model.load_state_dict(torch.load(stored.weights, map_location="cpu", weights_only=True))
        return model

    def load_guide(
        self, key: str, info: ModelInfo, data_stats: tuple[tuple[float, ...], tuple[float, ...]]
    ) -> torch.nn.Module:
        """The stored model as a guide of a stage whose inputs are standardised with ``data_stats``: a given
        teacher that expects other statistics (``meta["input_stats"]``) gets its inputs re-standardised."""
        stored = self.find(key)
        if stored is None:
            raise FileNotFoundError(f"model {key} is not in the store at {self.location}")
        own = stored.meta["input_stats"]
        return restandardized(self.load(key, info), data_stats, (own["mean"], own["std"]))
