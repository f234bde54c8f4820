"""One search trial: a Ray Tune function trainable that runs one experiment and reports every epoch.

A trial trains its guides (teacher, assistants, pacemaker) only if no other trial has: each guide is
trained under a file lock on its store key, so concurrent trials that need the same model wait for
the first one and then load it. The student's epochs are reported to Tune (ASHA decides from them)
and logged to the trial's MLflow run. With ``scaling.num_workers: 0`` the student trains in the trial
process; with N >= 1 the trial launches a Ray Train ``TorchTrainer`` whose chief's reports reach Tune
through ``TuneReportCallback`` (``Tuner(trainer)`` does not work with Train V2).

The trial's MLflow run is found by its Tune trial id, so a retried or restored trial continues its run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from kdray.checkpoints import stage_folder_name
from kdray.config import ExperimentConfig
from kdray.data import load_dataset
from kdray.distributed import local_context
from kdray.engine import TrainingDiverged
from kdray.guide_cache import anchored
from kdray.run import mark_failed, run_stage, run_tags
from kdray.search.space import trial_config
from kdray.stages import StagePlan, plan_stages
from kdray.store import ModelStore
from kdray.tracking import Tracking, flatten

log = logging.getLogger(__name__)

TRIAL_ID_TAG = "kdray.trial_id"


def trial_run(tracking: Tracking, parent: str, trial_id: str, cfg: ExperimentConfig, sampled: dict[str, Any]) -> str:
    """The trial's MLflow run (a child of the search run): found by trial id, else created."""
    existing = tracking.client.search_runs(
        [tracking.experiment_id],
        f"tags.`{TRIAL_ID_TAG}` = '{trial_id}' and tags.`mlflow.parentRunId` = '{parent}'",
    )
    if existing:
        run_id = existing[0].info.run_id
        tracking.reopen(run_id)
        return run_id
    tags = {**run_tags(cfg), "kdray.role": "trial", TRIAL_ID_TAG: trial_id, "kdray.sampled": json.dumps(sampled)}
    run_id = tracking.start_run(f"trial-{trial_id.rsplit('_', 1)[-1]}-{cfg.method.name}", tags, parent)
    tracking.log_params(run_id, flatten(cfg.dump()))
    tracking.log_text(run_id, cfg.to_yaml(), "config.yaml")
    return run_id


def run_trial(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """Tune entry point. ``config["overrides"]`` holds the sampled values; ``setup`` what all trials share:
    the base config, the search run id and name, the model store root."""
    import ray.tune

    cfg = trial_config(setup["base"], config["overrides"])
    trial_id = ray.tune.get_context().get_trial_id()
    tracking = Tracking(cfg.tracking.uri, cfg.tracking.experiment)
    run_id = trial_run(tracking, setup["parent_run_id"], trial_id, cfg, config["overrides"])
    open_runs = [run_id]
    try:
        final = _train(cfg, setup, trial_id, tracking, run_id, open_runs)
    except TrainingDiverged as error:
        # Not worth a retry (same seed, same NaN): end the trial with the worst score, the search goes on.
        mark_failed(tracking, open_runs, error)
        worst = -math.inf if cfg.search.mode == "max" else math.inf
        _final_report({cfg.search.metric: worst, "epoch": cfg.train.epochs, "kdray_diverged": 1})
        return
    except BaseException as error:
        # The guide runs this trial opened are closed here. The trial's own run is left to the driver's
        # TrialRunCloser, which knows why the trial ended: FAILED after its last retry, or KILLED when the
        # scheduler stopped it -- a stop reaches a Ray Train trial as an error from its TorchTrainer
        # (or as SystemExit in-process), which must not be recorded as a failure.
        mark_failed(tracking, open_runs[1:], error)
        raise
    tracking.end_run(run_id)
    _final_report({**final, "epoch": cfg.train.epochs})


def _final_report(metrics: dict[str, float]) -> None:
    """The trial's last report, sent once its run is closed: a scheduler's stop decision on it
    (``SystemExit`` from ``report``) has nothing left to interrupt."""
    import ray.tune

    with contextlib.suppress(SystemExit):
        ray.tune.report(metrics)


def _train(
    cfg: ExperimentConfig, setup: dict[str, Any], trial_id: str, tracking: Tracking, run_id: str, open_runs: list[str]
) -> dict[str, float]:
    """Guides under their store locks (the run's tags count them trained / reused), then the student,
    reporting to Tune; returns the student's final metrics."""
    if cfg.scaling.threads:
        torch.set_num_threads(cfg.scaling.threads)
    cfg = anchored(cfg, setup["store"])  # Tune runs this in the trial's folder: one cache for all trials
    ctx = local_context(cfg.scaling.use_gpu) if cfg.scaling.num_workers == 0 else None
    store = ModelStore(Path(setup["store"]))
    dataset = load_dataset(cfg.data)
    plans = plan_stages(cfg, dataset.fingerprint(), owner=trial_id)
    tags = run_tags(cfg)
    trained = reused = 0
    for plan in plans[:-1]:
        with store.lock(plan.key):
            if store.find(plan.key) is not None:
                reused += 1
                continue
            child = tracking.start_run(
                plan.role, {**tags, "kdray.role": plan.role, "kdray.model_key": plan.key}, run_id
            )
            open_runs.append(child)
            run_stage(
                cfg, plan, dataset, store, tracking, child, ctx, stage_folder_name(setup["search_name"], plan.key)
            )
            tracking.end_run(open_runs.pop())
            trained += 1
    tracking.set_tags(run_id, {"kdray.models_trained": str(trained), "kdray.models_reused": str(reused)})
    student: StagePlan = plans[-1]
    tracking.set_tags(run_id, {"kdray.model_key": student.key})
    stored = store.find(student.key)
    if stored is not None:  # an identical trial already trained this student: its result is this one's
        tracking.set_tags(run_id, {"kdray.reused": "true"})
        logged = tracking.client.get_run(run_id).data.metrics  # a restored trial may hold them already
        missing = {k: v for k, v in stored.meta["metrics"].items() if k not in logged}
        tracking.logger(run_id).log_metrics(missing, step=student.train.epochs)
        return stored.meta["metrics"]
    folder = stage_folder_name(f"{setup['search_name']}-{trial_id}", student.key)
    outcome = run_stage(cfg, student, dataset, store, tracking, run_id, ctx, folder, report_to_tune=True)
    return outcome.metrics
