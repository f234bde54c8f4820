"""One search trial: a Ray Tune function trainable that runs one experiment and reports every epoch.

A trial trains its guides (teacher, assistants, pacemaker) only if no other trial has: each stage
runs through ``kdray.stage_runner`` under a file lock on its store key, so concurrent trials that
need the same model wait for the first one and then load it. The student's epochs are reported to
Tune (ASHA decides from them) and logged to the trial's MLflow run. With ``scaling.num_workers: 0``
the student trains in the trial process; with N >= 1 the trial launches a Ray Train ``TorchTrainer``
whose chief's reports reach Tune through ``TuneReportCallback`` (``Tuner(trainer)`` does not work
with Train V2).

The trial's MLflow run is found by its Tune trial id, so a retried or restored trial continues its run; a
trial of a resumed search that drew the values of a run Tune lost in the kill takes that run over
(``kdray.search.unrecorded``).

With ``search.reuse_actors`` (the default) Tune starts the next trial in the process of one that ended,
skipping a fresh process's imports. A trial stopped by the scheduler is then ended by Tune's
``reset_config`` raising ``SystemExit`` in its last ``report``; Tune gives that thread
``TUNE_FUNCTION_THREAD_TIMEOUT_S`` (2 s) to finish and otherwise aborts the *next* trial. Closing a
trial's data loaders and MLflow writes can take longer than that on a busy machine, so trials raise it
(``REUSE_TIMEOUT_S``) unless the user set it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
from dataclasses import replace
from typing import Any

from kdray import tag_names as tag
from kdray.build import model_info
from kdray.cost import cost_on_target
from kdray.data import load_dataset
from kdray.engine import TrainingDiverged
from kdray.models import ModelInfo
from kdray.run import run_tags
from kdray.schema import ExperimentConfig
from kdray.search.space import trial_config, trial_label
from kdray.search.unrecorded import TRIAL_ROLE, adopt, runs_of_trial
from kdray.stage_runner import StageRunner, TuneTrial
from kdray.stages import StagePlan, plan_stages
from kdray.store import ModelStore, open_store
from kdray.tracking import Tracker, flatten

log = logging.getLogger(__name__)

REUSE_TIMEOUT_S = "60"


def finished_run(tracker: Tracker, parent: str, trial_id: str) -> Any | None:
    """The trial's run if it already ran its whole budget: a search restored from a state saved before the trial
    ended runs it again, and it must then report what it found instead of training (and retagging) again."""
    existing = runs_of_trial(tracker, parent, trial_id)
    if existing and existing[0].info.status == "FINISHED" and tag.STOPPED not in existing[0].data.tags:
        return existing[0]
    return None


def trial_run(
    tracker: Tracker, parent: str, trial_id: str, cfg: ExperimentConfig, sampled: dict[str, Any], label: str
) -> str:
    """The trial's MLflow run (a child of the search run): found by trial id, else created."""
    process = {tag.PROCESS: f"{socket.gethostname()}:{os.getpid()}"}
    existing = runs_of_trial(tracker, parent, trial_id)
    if existing:
        run_id = existing[0].info.run_id
        tracker.reopen(run_id)
        tracker.set_tags(run_id, process)
        return run_id
    tags = {
        **run_tags(cfg),
        tag.ROLE: TRIAL_ROLE,
        tag.TRIAL_ID: trial_id,
        tag.SAMPLED: json.dumps(sampled),
        **process,
    }
    run_id = tracker.start_run(label, tags, parent)
    tracker.log_params(run_id, flatten(cfg.dump()))
    tracker.log_text(run_id, cfg.to_yaml(), "config.yaml")
    return run_id


def run_trial(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """Tune entry point. ``config["overrides"]`` holds the sampled values; ``setup`` what all trials share:
    the base config, the search run id and name, and whether the search was resumed."""
    import ray.tune

    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", REUSE_TIMEOUT_S)  # read by the next reset_config
    cfg = trial_config(setup["base"], config["overrides"])
    trial_id = ray.tune.get_context().get_trial_id()
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    store = open_store(cfg.store)
    label = trial_label(cfg.method.name, config["overrides"], trial_id)
    if setup.get("resumed"):
        adopt(tracker, store, setup["parent_run_id"], trial_id, config["overrides"], label)
    done = finished_run(tracker, setup["parent_run_id"], trial_id)
    if done is not None:
        ray.tune.report({**done.data.metrics, "epoch": cfg.train.epochs})
        return
    run_id = trial_run(tracker, setup["parent_run_id"], trial_id, cfg, config["overrides"], label)
    owner = tracker.tags(run_id).get(tag.FIRST_TRIAL_ID, trial_id)  # a run taken over keeps its models' keys
    try:
        _train(cfg, f"{setup['search_name']}-{trial_id}", owner, store, tracker, run_id)
    except TrainingDiverged as error:
        # Not worth a retry (same seed, same NaN): end the trial with the worst score, the search goes on. Any
        # guide run this trial opened has ended already; on other errors the trial's own run is left to the
        # driver's TrialRunCloser, which knows why the trial ended: FAILED after its last retry, or FINISHED and
        # tagged stopped when the scheduler stopped it -- a stop reaches a Ray Train trial as an error from its
        # TorchTrainer (or as SystemExit in-process), which must not be recorded as a failure.
        tracker.fail(run_id, error)
        worst = -math.inf if cfg.search.mode == "max" else math.inf
        ray.tune.report({cfg.search.metric: worst, "epoch": cfg.train.epochs, "kdray_diverged": 1})
    finally:
        release_gpu_cache()


def release_gpu_cache() -> None:
    """Give the GPU memory torch's allocator keeps cached back to the device: a reused trial process would
    otherwise hold its last trial's peak while other trials share the GPU (fractional ``resources_per_trial``)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _train(
    cfg: ExperimentConfig,
    trial_name: str,
    owner: str,
    store: ModelStore,
    tracker: Tracker,
    run_id: str,
) -> None:
    """Guides first (the run's tags count them trained / reused), then the student, reporting to Tune.
    ``owner`` (the trial that opened the run) enters the models' keys when ``store.reuse`` is off.

    Every stage goes through the same ``StageRunner`` as ``kdray train``: under its store lock, so
    concurrent trials that need one teacher train it once, and resumed from its checkpoint."""
    import ray.tune

    dataset = load_dataset(cfg.data)
    plans = plan_stages(cfg, dataset.fingerprint(), owner=owner, info=model_info(dataset))
    runner = StageRunner(cfg, dataset, store, tracker)
    counts = runner.train_guides(plans[:-1], run_id, run_tags(cfg))
    if tag.MODELS_TRAINED not in tracker.tags(run_id):  # a resumed trial's guides were counted before
        tracker.set_tags(run_id, {tag.MODELS_TRAINED: str(counts["trained"]), tag.MODELS_REUSED: str(counts["reused"])})
    student = plans[-1]
    tracker.set_tags(run_id, {tag.MODEL_KEY: student.key})
    if cfg.search.measures_cost:
        log_cost(cfg, student, model_info(dataset), tracker, run_id)
    outcome = runner.run(student, run_id, TuneTrial(trial_name))
    if outcome.reused:  # an identical trial already trained this student: its result is this one's
        ray.tune.report({**outcome.metrics, "epoch": student.train.epochs})


def log_cost(cfg: ExperimentConfig, student: StagePlan, info: ModelInfo, tracker: Tracker, run_id: str) -> None:
    """The student's cost (``kdray.cost``: params, MACs, latency, throughput) on the trial's run, before it
    trains: measured once per architecture and machine, read back by every later trial (tag ``kdray.cost_source``).
    The driver's searcher reads it from the run to score the trial (``kdray.search.objectives``)."""
    shape = replace(info, onthefly=student.model.onthefly, batchnorm=student.model.batchnorm)
    cost, measured = cost_on_target(student.model.name, shape, cfg.search.cost, cfg.data.cache_dir)
    tracker.log_metrics(run_id, cost.metrics(), step=0)
    tracker.set_tags(run_id, {
        tag.COST_SOURCE: "measured" if measured else "reused",
        tag.COST_TARGET: f"{cost.target}, {cost.threads} thread(s), batch 1 and {cost.batch}",
    })  # fmt: skip
