"""Checks that need the data, run once the data is loaded and before anything trains or any run is opened.

The config alone cannot say whether a user's model builds for these images, whether a torchvision model
can be split into the stages a method reads, or whether given weights fit their architecture and the
data's classes: this builds every planned model once (on the CPU, without training) and reads the given
weights, so each of those problems is one line naming the field, not a traceback from a Ray worker.
"""

from __future__ import annotations

from dataclasses import replace

from kdray.build import model_info
from kdray.config import ConfigError, ExperimentConfig
from kdray.data import Dataset
from kdray.methods import METHODS
from kdray.models import build_model
from kdray.stages import StagePlan, plan_stages


def check_models(cfg: ExperimentConfig, dataset: Dataset) -> list[StagePlan]:
    """Plan the stages (reading and checking given weights) and build each planned model; the plans."""
    info = model_info(dataset)
    plans = plan_stages(cfg, dataset.fingerprint(), info=info)
    for plan in plans:
        field = "student" if plan is plans[-1] else plan.role
        try:
            model = build_model(
                plan.model.name, replace(info, onthefly=plan.model.onthefly, batchnorm=plan.model.batchnorm)
            )
        except ValueError as error:
            raise ConfigError(f"{field}.name: {error}") from None
        method = METHODS[plan.method.name]
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
