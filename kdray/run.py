"""``kdray train``: one experiment, stage by stage, with the model store and MLflow around the engine.

MLflow layout: one parent run per invocation (params = the flattened resolved config, artifact
``config.yaml``), one child run per stage. A stage found in the store is not trained again; its
child run is tagged ``kdray.reused=true`` with ``kdray.source_run_id`` pointing at the run that
trained it. The store entry is written before any MLflow artifact, so a tracking failure never
loses a trained model; a failure marks the open runs FAILED (KILLED on Ctrl-C).
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import torch

import kdray
from kdray.checkpoints import LocalCheckpointer, stage_folder_name
from kdray.config import ExperimentConfig
from kdray.data import Dataset, load_dataset
from kdray.distributed import WorkerContext, local_context
from kdray.engine import Checkpointer, fit, model_info
from kdray.stages import StagePlan, plan_stages
from kdray.store import ModelStore, StoredModel, model_key
from kdray.tracking import Tracking, flatten
from kdray.ui import view_hint

log = logging.getLogger(__name__)


@dataclass
class StageOutcome:
    plan: StagePlan
    stored: StoredModel
    run_id: str
    reused: bool
    metrics: dict[str, float]


@dataclass
class ExperimentResult:
    parent_run_id: str
    stages: list[StageOutcome] = field(default_factory=list)

    @property
    def student(self) -> StageOutcome:
        return self.stages[-1]


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
    except OSError:
        return None
    return out.stdout.strip() or None


def run_tags(cfg: ExperimentConfig) -> dict[str, str]:
    tags = {
        "kdray.version": kdray.__version__,
        "method": cfg.method.name,
        "dataset": cfg.data.name,
        "teacher": cfg.teacher.name,
        "student": cfg.student.name,
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def run_experiment(
    cfg: ExperimentConfig, parent_run_id: str | None = None, role: str = "experiment"
) -> ExperimentResult:
    """Train (or reuse) every stage of ``cfg`` and record it all in MLflow.

    ``parent_run_id`` nests the experiment's run under another (a search's reference runs do that).

    If the newest run of this name and config did not finish (its driver was killed, or it failed),
    this call continues it: the same parent run, finished stages taken from the store, the interrupted
    stage resumed from its last checkpoint in its own child run.
    """
    # In-process runs train here; Ray runs pick each worker's device on the worker.
    ctx = local_context(cfg.scaling.use_gpu) if cfg.scaling.num_workers == 0 else None
    if cfg.scaling.threads:
        torch.set_num_threads(cfg.scaling.threads)
    tracking = Tracking(cfg.tracking.uri, cfg.tracking.experiment)
    dataset = load_dataset(cfg.data)
    store = ModelStore(Path(cfg.store.path).expanduser().resolve())
    tags = {**run_tags(cfg), "kdray.config_hash": model_key(cfg.dump())}
    name = run_name(cfg)
    unfinished = tracking.find_unfinished(name, {"kdray.role": role, "kdray.config_hash": tags["kdray.config_hash"]})
    if unfinished is not None:
        parent = unfinished.info.run_id
        log.info("continuing the unfinished run '%s' (%s)", name, parent)
        tracking.reopen(parent)
        earlier = tracking.children(parent)
    else:
        parent = tracking.start_run(name, {**tags, "kdray.role": role}, parent_run_id)
        earlier = {}
    plans = plan_stages(cfg, dataset.fingerprint(), owner=parent)
    result = ExperimentResult(parent)
    open_runs = [parent]
    try:
        if unfinished is None:
            tracking.log_params(parent, flatten(cfg.dump()))
            tracking.log_text(parent, cfg.to_yaml(), "config.yaml")
        for plan in plans:
            previous = earlier.get(plan.key)
            stored = store.find(plan.key)
            if previous is not None and previous.info.status == "FINISHED" and stored is not None:
                result.stages.append(StageOutcome(plan, stored, previous.info.run_id, True, stored.meta["metrics"]))
                continue
            if previous is not None:
                child = previous.info.run_id
                tracking.reopen(child)
            else:
                child = tracking.start_run(
                    plan.role, {**tags, "kdray.role": plan.role, "kdray.model_key": plan.key}, parent
                )
            open_runs.append(child)
            outcome = run_stage(cfg, plan, dataset, store, tracking, child, ctx, stage_folder_name(name, plan.key))
            result.stages.append(outcome)
            tracking.end_run(open_runs.pop())
        tracking.log_params(parent, {"data.fingerprint": dataset.fingerprint()})
        tracking.logger(parent).log_metrics(result.student.metrics, step=cfg.train.epochs)
        tracking.end_run(open_runs.pop())
    except BaseException as error:
        mark_failed(tracking, open_runs, error)
        raise
    return result


def run_name(cfg: ExperimentConfig) -> str:
    return cfg.tracking.run_name or f"{cfg.method.name}-{cfg.student.name}"


def mark_failed(tracking: Tracking, run_ids: list[str], error: BaseException) -> None:
    """Close the open runs as FAILED (KILLED on Ctrl-C); a broken tracking store must not hide ``error``."""
    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    for run_id in reversed(run_ids):
        try:
            tracking.set_tags(run_id, {"kdray.error": f"{type(error).__name__}: {error}"[:5000]})
            tracking.end_run(run_id, status)
        except Exception as tracking_error:  # reported; the original error propagates
            log.warning("could not mark MLflow run %s %s: %s", run_id, status, tracking_error)


def run_stage(
    cfg: ExperimentConfig,
    plan: StagePlan,
    dataset: Dataset,
    store: ModelStore,
    tracking: Tracking,
    run_id: str,
    ctx: WorkerContext | None,
    folder_name: str,
    report_to_tune: bool = False,
) -> StageOutcome:
    """Train one stage (or take it from the store) into MLflow run ``run_id`` and the store.

    Checkpoints go to ``scaling.storage_path/folder_name``. ``report_to_tune``: the stage is a search
    trial's student, whose epochs (and checkpoints) are reported to Ray Tune.
    """
    stage_params = {
        **{f"model.{k}": v for k, v in plan.model.model_dump().items()},
        **{f"train.{k}": v for k, v in plan.train.model_dump().items()},
        "guides": ",".join(plan.guides) or "-",
        **{f"method.{k}": v for k, v in plan.method.model_dump().items()},
    }
    tracking.log_params(run_id, stage_params)
    stored = store.find(plan.key)
    if stored is not None:
        log.info("%-8s %s reused from the model store (%s)", plan.role, plan.model.name, plan.key)
        tracking.set_tags(
            run_id, {"kdray.reused": "true", "kdray.source_run_id": str(stored.meta.get("mlflow_run_id", ""))}
        )
        tracking.logger(run_id).log_metrics(stored.meta["metrics"], step=plan.train.epochs)
        return StageOutcome(plan, stored, run_id, True, stored.meta["metrics"])
    checkpointer = None
    if cfg.scaling.num_workers >= 1:
        from kdray.launch import fit_on_ray

        outcome = fit_on_ray(cfg, plan, store.root, tracking.uri, run_id, folder_name, report_to_tune)
    else:
        assert ctx is not None
        guides = [store.load(key, model_info(dataset)) for key in plan.guides]
        every = cfg.scaling.checkpoint_every
        if report_to_tune:
            from kdray.launch import RayCheckpointer

            checkpointer: Checkpointer = RayCheckpointer(ctx, every, plan.train.epochs, api="tune")
        else:
            folder = Path(cfg.scaling.storage_path).expanduser().resolve() / folder_name
            checkpointer = LocalCheckpointer(folder, every, plan.train.epochs, ctx.device)
        outcome = fit(cfg, plan, dataset, guides, ctx, tracking.continuing_logger(run_id), checkpointer=checkpointer)
        if checkpointer.resumed_from is not None:
            tracking.set_tags(run_id, {"kdray.resumed_from_epoch": str(checkpointer.resumed_from)})
    meta = {
        "model": plan.model.model_dump(),
        "role": plan.role,
        "method": plan.method.model_dump(),
        "guides": plan.guides,
        "metrics": outcome.final,
        "mlflow_run_id": run_id,
        "kdray_version": kdray.__version__,
    }
    stored = store.save(plan.key, outcome.state_dict, cfg.to_yaml(), meta)
    tracking.set_tags(run_id, {"kdray.reused": "false"})
    # val/* of the last epoch is already in the per-epoch history; only test/* is new.
    tests = {name: value for name, value in outcome.final.items() if name.startswith("test/")}
    tracking.logger(run_id).log_metrics(tests, step=plan.train.epochs)
    tracking.log_artifact(run_id, stored.weights)
    tracking.log_artifact(run_id, stored.path / "config.yaml")
    if isinstance(checkpointer, LocalCheckpointer):
        checkpointer.discard()
    return StageOutcome(plan, stored, run_id, False, outcome.final)


def describe(result: ExperimentResult, cfg: ExperimentConfig) -> str:
    """A short table for the terminal: what was trained or reused, and how well it does."""
    lines = [f"{'stage':<11}{'model':<12}{'key':<26}{'source':<9}{'val_acc':>8}{'test_acc':>9}"]
    for stage in result.stages:
        test = stage.metrics.get("test/acc")
        lines.append(
            f"{stage.plan.role:<11}{stage.plan.model.name:<12}{stage.plan.key:<26}"
            f"{'reused' if stage.reused else 'trained':<9}{stage.metrics['val/acc']:>8.4f}"
            f"{(f'{test:.4f}' if test is not None else '-'):>9}"
        )
    lines.append(f"MLflow: run {result.parent_run_id} in experiment '{cfg.tracking.experiment}' at {cfg.tracking.uri}")
    lines.append(f"        view it with: {view_hint(cfg.tracking.uri)}")
    lines.append(f"Store:  {Path(cfg.store.path).expanduser()}")
    return "\n".join(lines)
