"""Training-state checkpoints of in-process stages, and the folder name every stage's checkpoints use.

A stage's checkpoints live under ``scaling.storage_path/<run name>-<stage key>``: the same folder for
an in-process run (this module) and for a Ray Train run (its ``RunConfig.name``). Rerunning an
interrupted ``kdray train`` with the same run name and config therefore finds the folder and continues
after the last checkpointed epoch; a changed config gives a different stage key and a fresh start.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch


def stage_folder_name(run_name: str, key: str) -> str:
    """``<run name>-<stage key>`` with anything but letters, digits, ``.``, ``_`` and ``-`` replaced."""
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', run_name)}-{key}"


class LocalCheckpointer:
    """Keeps the latest training state of an in-process stage in one file, replaced atomically."""

    def __init__(self, folder: Path, every: int, epochs: int, device: torch.device) -> None:
        self.folder = folder
        self.file = folder / "state.pt"
        self.every = every
        self.epochs = epochs
        self.device = device
        self.resumed_from: int | None = None

    def restore(self) -> dict[str, Any] | None:
        if not self.file.exists():
            return None
        state = torch.load(self.file, map_location=self.device, weights_only=True)
        self.resumed_from = state["epoch"]
        return state

    def save(self, epoch: int, state: dict[str, Any], metrics: dict[str, float]) -> None:
        """Every K epochs: write next to the file, then rename over it (a kill mid-write keeps the old one)."""
        if epoch % self.every and epoch != self.epochs:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.file.with_suffix(f".{os.getpid()}.partial")
        torch.save(state, partial)
        os.replace(partial, self.file)

    def discard(self) -> None:
        """Once the stage's model is in the store its training state has no further use."""
        shutil.rmtree(self.folder, ignore_errors=True)
