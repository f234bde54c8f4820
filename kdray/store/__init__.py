"""The model store: every trained model under a content hash of what produced it, in a folder (``folder.py``) or
in a bucket (``bucket.py``: entries published by conditional writes, locks as leases, read through a local
mirror). ``open_store`` picks the one ``store.path`` names."""

import filelock

from kdray.schema.storage import StoreConfig
from kdray.store.bucket import BucketStore, check_bucket
from kdray.store.folder import STORE_FORMAT, ModelStore, StoredModel, entry_problem, file_digest, is_key, model_key
from kdray.store.lease import BucketLease
from kdray.store.objects import SCHEME

# What ``ModelStore.lock`` hands out: a file lock in a folder, a lease in a bucket; both raise filelock.Timeout.
StoreLock = filelock.BaseFileLock | BucketLease


def open_store(config: StoreConfig) -> ModelStore:
    """The store at ``config.path``: a bucket for ``s3://…``, else a folder."""
    if config.path.startswith(SCHEME):
        return BucketStore(config.path, config.lease_seconds)
    return ModelStore(config.path)


__all__ = [
    "STORE_FORMAT", "BucketStore", "ModelStore", "StoreLock", "StoredModel", "check_bucket", "entry_problem",
    "file_digest", "is_key", "model_key", "open_store",
]  # fmt: skip
