"""Where results go: the MLflow tracking store, the model store, and the cache of frozen guides' outputs."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from kdray.schema.fields import AbsolutePath, PlainName, Section, absolute_uri, default_store_path, default_tracking_uri

# The guide-output cache's folder inside the model store unless guide_cache.path says otherwise: a folder of the
# store that is not an entry (the store never lists, checks or moves it).
GUIDE_OUTPUTS_FOLDER = "guide-outputs"


class TrackingConfig(Section):
    uri: Annotated[str, AfterValidator(absolute_uri)] = Field(
        default_factory=default_tracking_uri,
        validate_default=True,
        description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db as sqlite).",
    )
    experiment: PlainName = Field("kdray", description="MLflow experiment name.")
    run_name: PlainName | None = Field(None, description="Name of the parent run (default: method-student).")


def store_location(path: str) -> str:
    """A local folder or an ``s3://`` bucket: no other URI can hold a model store."""
    if "://" in path and not path.startswith("s3://"):
        raise ValueError(f"{path.split('://')[0]}:// cannot hold a model store; give a folder or s3://bucket/prefix")
    return path


class StoreConfig(Section):
    path: Annotated[AbsolutePath, AfterValidator(store_location)] = Field(
        default_factory=default_store_path,
        validate_default=True,
        description="Model store: trained models by content hash (default: $KDRAY_STORE_PATH, else .kdray/store). "
        "On several nodes: a folder every node reaches with working file locks (NFSv4), or s3://bucket/prefix "
        "(entries published by conditional writes, locks as leases in the bucket; docs/cluster.md).",
    )
    lease_seconds: float = Field(
        60.0,
        ge=2,
        le=3600,
        description="s3:// stores: a lock's term; a holder renews it every third of it, and a dead holder's lock is "
        "taken over once it is this old.",
    )
    reuse: bool = Field(
        True, description="false: every run (every search trial) trains its own teacher and assistants (a baseline)."
    )


class GuideCacheConfig(Section):
    enabled: bool = Field(
        True, description="Reuse frozen guides' logits per (training image, crop, flip) in later epochs and runs."
    )
    dtype: Literal["float32", "float16"] = Field(
        "float32", description="Stored precision: float32 is exact, float16 halves the size and rounds the logits."
    )
    max_gb: float = Field(
        8.0, gt=0, description="Disk budget of the cache folder (old tables are evicted; big ones cover fewer images)."
    )
    path: AbsolutePath | None = Field(
        None, description="Cache folder (null = <store.path>/guide-outputs); shared by all workers, like the store."
    )
