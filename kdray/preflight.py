"""Checks run before anything trains or any run is opened: can kdray write where it will write, and (once
the data is loaded) do the planned models fit it.

Writing is tested by writing (a temporary file in each folder), not by looking at permissions: a
read-only mount, a quota or an ACL answers only then.

The config alone cannot say whether a user's model builds for these images, whether a torchvision model
can be split into the stages a method reads, whether given weights fit their architecture and the
data's classes, or whether a batch fits each worker's share of the images: this builds every planned
model once (on the CPU, without training), reads the given weights and counts the batches, so each of
those problems is one line naming the field, not a traceback from a Ray worker (where a retry would
fail the same way).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path

from kdray.build import check_batch_fits, model_info
from kdray.data import Dataset
from kdray.distributed import pick_device
from kdray.methods import METHODS
from kdray.models import StagedNet, build_model
from kdray.schema import ConfigError, ExperimentConfig
from kdray.stages import StagePlan, plan_stages
from kdray.store import check_bucket


def check_device(cfg: ExperimentConfig) -> None:
    """A run that trains in this process and asks for a GPU the machine lacks is refused before any work (on
    Ray Train workers each worker gets the device Ray gives it)."""
    if not cfg.scaling.on_ray_train:
        pick_device(cfg.scaling.use_gpu)


def check_writable(cfg: ExperimentConfig) -> None:
    """Every folder kdray writes (the model store, or the bucket that holds it, the image cache, the guide-output
    cache, the local Ray storage, a sqlite MLflow store) must take a write before Ray or MLflow start: an
    unwritable sqlite file otherwise retries for minutes, a read-only store or cache fails after training began."""
    if "://" in cfg.store.path:
        check_bucket(cfg.store.path)
    else:
        _writable(Path(cfg.store.path), "store.path")
    _writable(Path(cfg.data.cache_dir), "data.cache_dir")
    if cfg.guide_cache.enabled and cfg.guide_cache.path is not None:
        _writable(Path(cfg.guide_cache.path), "guide_cache.path")
    if "://" not in cfg.scaling.storage_path:
        _writable(Path(cfg.scaling.storage_path), "scaling.storage_path")
    if cfg.tracking.uri.startswith("sqlite:///"):
        database = Path(cfg.tracking.uri.removeprefix("sqlite:///"))
        if database.parent.is_dir():  # a missing folder is Tracker's one-line error
            _writable(database.parent, "tracking.uri")
        if database.exists() and not os.access(database, os.W_OK):
            raise ConfigError(f"tracking.uri: the sqlite store {database} is read-only; make it writable or move it")


def _writable(folder: Path, field: str) -> None:
    """Write a file in ``folder``, or in its nearest existing parent when it is not there yet (a refusal
    leaves nothing behind, not even the folders)."""
    existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file")
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".kdray-write-test-"):
            pass
    except OSError as error:
        raise ConfigError(
            f"{field}: cannot write in {folder} ({error.strerror or error}); choose a folder kdray can write to"
        ) from None


def check_models(cfg: ExperimentConfig, dataset: Dataset) -> list[StagePlan]:
    """Plan the stages (reading and checking given weights), build each planned model and check that its
    batches fit the training split as the workers will shard it; the plans."""
    info = model_info(dataset)
    plans = plan_stages(cfg, dataset.fingerprint(), info=info)
    models: dict[str, StagedNet] = {}
    for plan in plans:
        if plan.weights is None:
            check_batch_fits(plan.train.batch_size, len(dataset.train), cfg.scaling.data_shards)
        field = "student" if plan is plans[-1] else plan.role
        try:
            model = build_model(
                plan.model.name, replace(info, onthefly=plan.model.onthefly, batchnorm=plan.model.batchnorm)
            )
        except ValueError as error:
            raise ConfigError(f"{field}.name: {error}") from None
        models[plan.key] = model
        method = METHODS[plan.method.name]
        for key in plan.guides if method.guide_stages else []:
            guide = next(p for p in plans if p.key == key)
            if len(models[key].stage_names) < method.guide_stages:
                raise ConfigError(
                    f"{guide.role}.name: method '{plan.method.name}' reads the stages of its {guide.role} and "
                    f"{guide.model.name} has none kdray can address; choose another {guide.role} or method"
                )
        if len(model.stage_names) < method.student_stages:
            raise ConfigError(
                f"{field}.name: method '{plan.method.name}' reads {method.student_stages} stage(s) of the student but "
                f"{plan.model.name} has {len(model.stage_names)} kdray can address (kdray's own, torchvision's ResNet, "
                "MobileNet, EfficientNet, ConvNeXt and VGG models have them); choose another student or method"
            )
    return plans


def check_decode_cpus(cfg: ExperimentConfig, dataset: Dataset) -> None:
    """Refuse a streamed run whose Ray Train workers would hold every CPU of the cluster: Ray Data's
    decoding tasks would then wait for a CPU forever and the run would hang at its first batch."""
    if not (dataset.streamed and cfg.scaling.num_workers > 0):
        return
    import ray  # connected: the scan of a streamed folder ran on it

    total = ray.cluster_resources().get("CPU", 0.0)
    held = cfg.scaling.num_workers * cfg.scaling.resources_per_worker.get("CPU", 1.0)
    if total - held < cfg.data.decode_cpus:
        raise ConfigError(
            f"scaling.resources_per_worker: {cfg.scaling.num_workers} Ray Train workers hold {held:g} of the cluster's "
            f"{total:g} CPUs and streaming needs data.decode_cpus={cfg.data.decode_cpus:g} more to decode; ask for "
            "fewer CPUs per worker (e.g. scaling.resources_per_worker={CPU: 0.5}) or add CPU nodes"
        )
