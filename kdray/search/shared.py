"""Shared guides first: the guides every trial of a search needs (usually its teacher) are trained before the
trials start, once, with the resources of all the search's trial slots together.

Left to the trials, the first trial would train the teacher on its one slot while the others wait on the
teacher's store lock with their cores idle. Which guides are shared is read off the search space: a guide
is shared when every corner of the space (``kdray.search.space.corners``: each candidate method, each end of
each range, each choice) plans it under the same store key. A value that enters a guide's identity changes
its key between the ends of its range, so a guide whose key depends on a searched value is never trained
ahead. Trials then find the shared guides in the model store and only read them.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

from kdray import tag_names as tag
from kdray.build import model_info
from kdray.data import Dataset, load_dataset
from kdray.distributed import local_context
from kdray.resolve import validate_config
from kdray.run import run_tags
from kdray.schema import ExperimentConfig
from kdray.search.space import corners, trial_config
from kdray.stage_runner import StageRunner
from kdray.stages import StagePlan, plan_stages
from kdray.store import open_store
from kdray.tracking import Tracker

log = logging.getLogger(__name__)


def shared_guides(cfg: ExperimentConfig, dataset: Dataset) -> list[StagePlan]:
    """The guide stages every trial of the search plans alike, in training order (none when ``store.reuse``
    is off: then every trial keeps its own models; none when ``search.guides_first`` is off)."""
    if not cfg.store.reuse or not cfg.search.guides_first:
        return []
    base, info, fingerprint = cfg.dump(), model_info(dataset), dataset.fingerprint()
    first: list[StagePlan] = []
    common: set[str] | None = None
    for overrides in corners(cfg):
        guides = plan_stages(trial_config(base, overrides), fingerprint, info=info)[:-1]
        keys = {plan.key for plan in guides}
        common = keys if common is None else common & keys
        first = first or guides
    return [plan for plan in first if plan.key in (common or set())]


def slot_resources(cfg: ExperimentConfig) -> tuple[float, float]:
    """CPUs and GPUs of all the search's concurrent trial slots together, within the largest node (one
    process trains a guide): what a guide trained ahead of the trials may use."""
    import ray

    per_trial = cfg.search.resources_per_trial
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    cpus = min(per_trial.get("CPU", 1) * cfg.search.max_concurrent_trials, max(n.get("CPU", 0) for n in nodes))
    gpus = 1.0 if per_trial.get("GPU", 0) > 0 and any(n.get("GPU", 0) >= 1 for n in nodes) else 0.0
    return max(1.0, math.floor(cpus)), gpus


def train_shared_guides(cfg: ExperimentConfig, dataset: Dataset, tracker: Tracker, parent: str) -> float:
    """Train the shared guides the store lacks, each in its own run under the search run; the seconds it took.

    Trials that train in their Tune actor (``scaling.num_workers: 0``) get the guides trained with every
    slot's CPUs: in this process on kdray's own local Ray instance (no task to start), else in one Ray task
    holding those CPUs (or one GPU) wherever the cluster has them. Trials on Ray Train worker groups get them
    from a worker group of the trials' own shape, which a data-parallel model's identity requires (its world
    size is part of it)."""
    import ray

    store = open_store(cfg.store)
    missing = [plan for plan in shared_guides(cfg, dataset) if store.find(plan.key) is None]
    if not missing:
        return 0.0
    started = time.perf_counter()
    names = ", ".join(f"{plan.role} {plan.model.name}" for plan in missing)
    if cfg.scaling.on_ray_train:
        print(f"shared guides first: training {names} on {cfg.scaling.num_workers} Ray Train workers", flush=True)
        train_guides(cfg, missing, parent, None)
    else:
        cpus, gpus = slot_resources(cfg)
        here = gpus == 0 and not os.environ.get("RAY_ADDRESS")  # kdray's own local instance: this machine's CPUs
        where = f"{cpus:g} CPUs" + (" and 1 GPU" if gpus else "") + (" in this process" if here else " in a Ray task")
        print(f"shared guides first: training {names} with {where} before the trials start", flush=True)
        ahead = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"threads": int(cpus)})})
        if here:
            train_guides(ahead, missing, parent, local_context(False, int(cpus)), dataset)
        else:  # where the cluster has room (a GPU node, another machine)
            task = ray.remote(_train_guides_task).options(num_cpus=cpus, num_gpus=gpus)
            ray.get(task.remote(ahead.dump(), missing, parent))
    seconds = time.perf_counter() - started
    print(f"shared guides first: done in {seconds:.0f} s", flush=True)
    return seconds


def _train_guides_task(raw: dict[str, Any], plans: list[StagePlan], parent: str) -> None:
    cfg = validate_config(raw)
    train_guides(cfg, plans, parent, local_context(cfg.scaling.use_gpu, cfg.scaling.threads))


def train_guides(
    cfg: ExperimentConfig, plans: list[StagePlan], parent: str, ctx: Any, dataset: Dataset | None = None
) -> None:
    """Each of ``plans`` the store lacks, under its store lock (a trial of another search may be training
    it), resumed from its checkpoint after an interruption, in a new run under ``parent``."""
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    runner = StageRunner(cfg, dataset or load_dataset(cfg.data), open_store(cfg.store), tracker, ctx)
    runner.train_guides(plans, parent, {**run_tags(cfg), tag.SHARED_GUIDE: "true"})
