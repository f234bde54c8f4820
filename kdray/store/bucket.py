"""The model store in a bucket (``store.path: s3://bucket/prefix``): for clusters whose nodes share no POSIX file
system, only object storage (KubeRay, most cloud Ray clusters).

An entry is ``<key>/meta.json``, ``<key>/config.yaml`` and ``<key>/model-<sha256>.pt``. The weights and the
config are uploaded first; ``meta.json``, which records the weights' SHA-256, is then created with
``If-None-Match: *``: it is the entry's commit marker, so a reader sees a whole entry or none, and of two writers
of one key only the first publishes (the second keeps the first's entry, as in a folder). The weights are named
by their hash, so a late writer never overwrites the bytes a published entry points to.

Each node reads through a local mirror (``<cache>/store-mirrors/<hash of the URI>``, a store folder of its own):
a lookup reads ``meta.json`` from the bucket, and downloads the weights only where the mirror lacks that exact
entry; the download is checked against the SHA-256 before it enters the mirror. A damaged entry in the bucket is
moved aside to ``.quarantine/`` in the bucket (copied, then removed with ``meta.json`` first) and reported
missing, as in a folder. Locks are leases in the bucket (``kdray.store.lease``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from kdray.schema import ConfigError
from kdray.schema.fields import default_cache
from kdray.store.folder import ModelStore, StoredModel, entry_problem, is_key
from kdray.store.lease import BucketLease
from kdray.store.objects import Bucket

log = logging.getLogger(__name__)

_LEASES: dict[tuple[str, str], BucketLease] = {}


def weights_name(key: str, sha256: str) -> str:
    return f"{key}/model-{sha256[:16]}.pt"


class BucketStore(ModelStore):
    """A model store in ``s3://bucket/prefix`` read through a verified local mirror; locks are leases of
    ``lease_seconds``."""

    def __init__(self, uri: str, lease_seconds: float = 60.0, mirror: Path | None = None) -> None:
        self.bucket = Bucket(uri)
        digest = hashlib.blake2b(self.bucket.uri.encode(), digest_size=8).hexdigest()
        super().__init__(mirror or Path(default_cache()) / "store-mirrors" / digest)
        self.lease_seconds = lease_seconds

    @property
    def location(self) -> str:
        return self.bucket.uri

    def lock(self, key: str) -> BucketLease:  # type: ignore[override]
        """A lease on ``key`` in the bucket, the same object for every caller in this process (re-entrant)."""
        slot = (self.bucket.uri, key)
        if slot not in _LEASES:
            _LEASES[slot] = BucketLease(self.bucket, key, self.lease_seconds)
        return _LEASES[slot]

    def keys(self) -> list[str]:
        return [name for name in self.bucket.folders() if is_key(name)]

    def meta(self, key: str) -> dict[str, Any] | None:
        raw = self.bucket.get(f"{key}/meta.json") if is_key(key) else None
        try:
            return json.loads(raw) if raw is not None else None
        except ValueError:
            return None

    def find(self, key: str) -> StoredModel | None:
        """The entry ``key`` from the local mirror, brought up to date with the bucket and checked; a damaged
        entry in the bucket is quarantined there and reported missing."""
        if not is_key(key):
            return None
        raw = self.bucket.get(f"{key}/meta.json")
        if raw is None:
            shutil.rmtree(self.root / key, ignore_errors=True)  # gone from the bucket: so from the mirror
            return None
        problem = self._mirror(key, raw)
        if problem is not None:
            self._quarantine_in_bucket(key, raw, problem)
            return None
        return StoredModel(key, self.root / key, json.loads(raw))

    def _mirror(self, key: str, raw: bytes) -> str | None:
        """Make the mirror's entry ``key`` the one whose metadata is ``raw``; why the bucket's entry cannot be
        trusted, or None."""
        try:
            recorded = json.loads(raw)["weights_sha256"]
        except (ValueError, KeyError, TypeError):
            return f"{self.location}/{key}/meta.json is unreadable or records no content hash"
        entry = self.root / key
        if _mirrored(entry, raw):
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(os.path.join(self.root, f".{key}-download-{os.getpid()}-{time.monotonic_ns()}"))
        staging.mkdir()
        try:
            config = self.bucket.get(f"{key}/config.yaml")
            if config is None:
                return f"{self.location}/{key}/config.yaml is missing"
            if self.bucket.head(weights_name(key, recorded)) is None:
                return f"{self.location}/{weights_name(key, recorded)} is missing"
            self.bucket.download(weights_name(key, recorded), staging / "model.pt")
            (staging / "config.yaml").write_bytes(config)
            (staging / "meta.json").write_bytes(raw)
            problem = entry_problem(staging)
            if problem is not None:
                return problem.replace(str(staging / "model.pt"), f"{self.location}/{weights_name(key, recorded)}")
            _install(staging, entry, raw)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return None

    def problem(self, key: str) -> str | None:
        return self._problem(key, self.bucket.get(f"{key}/meta.json"))

    def _problem(self, key: str, raw: bytes | None) -> str | None:
        """What is wrong with the entry whose ``meta.json`` reads ``raw`` (None: missing), or None."""
        if raw is None:
            return f"{self.location}/{key}/meta.json is missing"
        return self._mirror(key, raw)

    def quarantine(self, key: str) -> Path | None:  # type: ignore[override]
        """Move a damaged entry of the bucket aside (see ``_quarantine_in_bucket``); where it went, or None. The
        metadata is read once: what is judged is what must still be there when the entry is moved."""
        if not is_key(key):
            return None
        raw = self.bucket.get(f"{key}/meta.json")
        problem = self._problem(key, raw)
        if problem is None:
            return None
        aside = self._quarantine_in_bucket(key, raw, problem)
        return Path(aside) if aside else None

    def _quarantine_in_bucket(self, key: str, raw: bytes | None, problem: str) -> str | None:
        """Under the entry's lease, if its metadata is still ``raw`` (nobody replaced it meanwhile): copy every
        object of the entry to ``.quarantine/<key>-<time>-<pid>/`` with the reason, then remove the entry's
        ``meta.json`` (from then on it is missing) and the rest. Never deletes a copy."""
        with self.lock(key):
            if self.bucket.get(f"{key}/meta.json") != raw:
                return None
            aside = f".quarantine/{key}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            names = self.bucket.names(key)
            for name in names:
                self.bucket.copy(name, f"{aside}/{name.removeprefix(key + '/')}")
            self.bucket.put(f"{aside}/QUARANTINED.txt", (problem + "\n").encode())
            if raw is not None:
                self.bucket.delete(f"{key}/meta.json")
            for name in names:
                self.bucket.delete(name)
            shutil.rmtree(self.root / key, ignore_errors=True)
        where = f"{self.location}/{aside}"
        log.warning("model store: %s; entry %s moved to %s, its stage will be trained again", problem, key, where)
        return where

    def save(
        self, key: str, state_dict: dict[str, torch.Tensor], config_yaml: str, meta: dict[str, Any]
    ) -> StoredModel:
        """Upload the weights and config, then publish the entry by creating its ``meta.json`` only if no entry is
        there; an intact entry already there is kept (and ours dropped), a damaged one is quarantined first."""
        staging = self.stage_entry(key, state_dict, config_yaml, meta)
        try:
            raw = (staging / "meta.json").read_bytes()
            sha256 = json.loads(raw)["weights_sha256"]
            self.bucket.upload(weights_name(key, sha256), staging / "model.pt")
            self.bucket.upload(f"{key}/config.yaml", staging / "config.yaml")
            published = self.bucket.put(f"{key}/meta.json", raw, if_none_match=True)
            if published is None and self.find(key) is None:  # theirs was damaged: quarantined now, ours goes in
                published = self.bucket.put(f"{key}/meta.json", raw, if_none_match=True)
            if published is not None:
                _install(staging, self.root / key, raw)
            elif (self.meta(key) or {}).get("weights_sha256") != sha256:  # another writer's entry stands
                self.bucket.delete(weights_name(key, sha256))  # ours is not needed (same bytes: the same object)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        stored = self.find(key)
        assert stored is not None
        return stored


def _mirrored(entry: Path, raw: bytes) -> bool:
    """Whether the mirror's ``entry`` is the intact copy of the bucket entry whose metadata is ``raw``."""
    try:
        return (entry / "meta.json").read_bytes() == raw and entry_problem(entry) is None
    except OSError:  # not there, or being replaced by another process of this node
        return False


def _install(staging: Path, entry: Path, raw: bytes) -> None:
    """Put a checked copy into the mirror in place of whatever is there; another process of the node that installed
    the same entry meanwhile is as good (a rename cannot replace a folder that is not empty)."""
    shutil.rmtree(entry, ignore_errors=True)
    try:
        os.replace(staging, entry)
    except OSError:
        if not _mirrored(entry, raw):
            raise


def check_bucket(uri: str) -> None:
    """A store in ``uri`` must take a write and refuse a second creation of the same name (the conditional write
    that publishes entries and takes leases): checked before any work, one line if not."""
    bucket = Bucket(uri)
    probe = f".locks/probe-{os.getpid()}-{time.monotonic_ns()}"
    try:
        created = bucket.put(probe, b"probe", if_none_match=True)
        refused = bucket.put(probe, b"again", if_none_match=True) is None
        bucket.delete(probe)
    except ConfigError:
        raise
    except Exception as error:
        raise ConfigError(
            f"store.path: cannot write in {uri} ({type(error).__name__}: {str(error)[:160]}); check the bucket and "
            "the AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_PROFILE)"
        ) from None
    if created is None or not refused:
        raise ConfigError(
            f"store.path: {uri} does not honour conditional writes (If-None-Match), which publish entries and take "
            "locks; use an S3 service that does (AWS S3, MinIO) or a shared folder"
        )
