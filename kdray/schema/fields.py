"""What every section of the schema shares: the frozen base, the integer bounds, and the pure helpers
that turn paths, URIs and names into their one meaning (no registry, no file read beyond a stat)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_METHOD = "kd"  # what `method:` means without a name

# Upper bounds of the integer fields, so a typo is one line here, not an overflow deep in numpy or torch.
SEED_MAX = 2**32 - 1  # numpy's seeds end here (torch's go further)
EPOCHS_MAX = 100_000
BATCH_MAX = 1 << 20  # images in one step of one worker
WORKERS_MAX = 4096  # Ray Train workers, threads, concurrent trials
NAME_LIMIT = 100


class ConfigError(ValueError):
    """A bad experiment file or override; the message is one line naming the field and the fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # The sections a trained model is keyed on (model, train, augmentation) say of every field whether it
    # determines the weights: in_weights fields enter the model's store key, not_in_weights fields (the same
    # math, faster or only evaluated more often) do not. tests/test_keys.py fails on a field that says neither.
    in_weights: ClassVar[frozenset[str]] = frozenset()
    not_in_weights: ClassVar[frozenset[str]] = frozenset()
    # in_weights fields added after models were stored, each with the default that computes what kdray computed
    # before the field existed: left out of the key at that default, so every stored model keeps its key.
    added_later: ClassVar[dict[str, Any]] = {}

    def identity(self) -> dict[str, Any]:
        """What of this section determines a trained model's weights (part of its store key)."""
        dumped = self.model_dump(mode="json", include=set(self.in_weights))
        return {k: v for k, v in dumped.items() if k not in self.added_later or v != self.added_later[k]}


def weights_source(weights: str) -> str:
    """Given weights: an MLflow model URI or ``pretrained[:TAG]`` as written, a local file made absolute."""
    if weights.startswith(("runs:/", "models:/", "pretrained")) or "://" in weights:
        return weights
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ValueError(f"'{weights}' is not a file; give a state-dict file, an MLflow model URI or pretrained")
    return str(path.resolve())


def absolute_path(path: str) -> str:
    """A local path made absolute (``~`` expanded); URLs (``s3://...``) as given."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


AbsolutePath = Annotated[str, AfterValidator(absolute_path)]


def absolute_uri(uri: str) -> str:
    """A sqlite URI with an absolute path: valid from any working directory (Ray workers have their own)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).expanduser().resolve())
    return uri


def plain_name(name: str) -> str:
    """A name kdray may turn into a folder (a search's) or show as a run or experiment: 1-100 printable
    characters, no path separator and no '..', so no folder derived from it can leave its root."""
    if not name.strip():
        raise ValueError("an empty name; give one")
    if len(name) > NAME_LIMIT:
        raise ValueError(f"{len(name)} characters long; keep it to {NAME_LIMIT}")
    if "/" in name or "\\" in name or ".." in name or not name.isprintable():
        raise ValueError(f"{name!r} is not a plain name: no '/', '\\', '..' or control characters")
    return name


PlainName = Annotated[str, AfterValidator(plain_name)]


def default_tracking_uri() -> str:
    """Where runs go unless a config or command says otherwise: $MLFLOW_TRACKING_URI, else ./mlflow.db."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def default_store_path() -> str:
    """The model store unless set: $KDRAY_STORE_PATH, else .kdray/store."""
    return os.environ.get("KDRAY_STORE_PATH") or ".kdray/store"


def default_storage_path() -> str:
    """Ray run storage unless set: $KDRAY_STORAGE_PATH (a cluster sets it), else .kdray/ray."""
    return os.environ.get("KDRAY_STORAGE_PATH") or ".kdray/ray"


def default_cache() -> str:
    """Where decoded image folders are cached unless set: $XDG_CACHE_HOME/kdray, else ~/.cache/kdray."""
    return str(Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "kdray")
