"""The model store: every trained model under a content hash of what produced it.

A model's key hashes its identity: architecture, data fingerprint and split, training recipe,
method and hyperparameters, the keys of the models that taught it, and the seed. A later run that
needs the same model (a teacher shared by many students, an assistant shared by many trials) loads
it instead of training it again. Entries are written to a staging folder and renamed into place, so
a crash or a concurrent writer never leaves a half-written model; weights load with
``weights_only=True``, which never unpickles code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import filelock
import torch

from kdray.models import ModelInfo, StagedNet, build_model
from kdray.models.deploy import restandardized

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


class ModelStore:
    """A folder of ``<key>/{model.pt, config.yaml, meta.json}`` entries."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def lock(self, key: str) -> filelock.FileLock:
        """An inter-process lock for producing entry ``key``: concurrent search trials that need the same
        teacher or assistant take it, and all but the first find the entry when they get it. (File locks
        need a file system that honours them; on a cluster, a shared POSIX file system such as NFSv4.)"""
        folder = self.root / ".locks"
        folder.mkdir(parents=True, exist_ok=True)
        return filelock.FileLock(folder / f"{key}.lock")

    def find(self, key: str) -> StoredModel | None:
        entry = self.root / key
        if not (entry / "meta.json").is_file():
            return None
        return StoredModel(key, entry, json.loads((entry / "meta.json").read_text()))

    def save(
        self, key: str, state_dict: dict[str, torch.Tensor], config_yaml: str, meta: dict[str, Any]
    ) -> StoredModel:
        """Write an entry atomically; if another writer got there first, keep theirs."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{key}-"))
        try:
            torch.save({name: tensor.detach().cpu() for name, tensor in state_dict.items()}, staging / "model.pt")
            (staging / "config.yaml").write_text(config_yaml)
            (staging / "meta.json").write_text(json.dumps({"key": key, **meta}, indent=2, sort_keys=True))
            os.replace(staging, self.root / key)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if self.find(key) is None:
                raise
        stored = self.find(key)
        assert stored is not None
        return stored

    def load(self, key: str, info: ModelInfo) -> StagedNet:
        """Build the stored architecture and load its weights (never executes pickled code)."""
        stored = self.find(key)
        if stored is None:
            raise FileNotFoundError(f"model {key} is not in the store at {self.root}")
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
            raise FileNotFoundError(f"model {key} is not in the store at {self.root}")
        own = stored.meta["input_stats"]
        return restandardized(self.load(key, info), data_stats, (own["mean"], own["std"]))
