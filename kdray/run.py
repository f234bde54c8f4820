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

import filelock

import kdray
from kdray import tag_names as tag
from kdray.build import model_info
from kdray.data import Dataset, load_dataset
from kdray.preflight import check_decode_cpus, check_device, check_models, check_writable
from kdray.schema import ExperimentConfig
from kdray.stage_runner import StageOutcome, StageRunner
from kdray.stages import plan_stages
from kdray.store import ModelStore, StoreLock, model_key, open_store
from kdray.tracking import Tracker, flatten
from kdray.ui import view_hint

log = logging.getLogger(__name__)


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
        tag.VERSION: kdray.__version__,
        "method": cfg.method.name,
        "dataset": cfg.data.name,
        "teacher": cfg.teacher.name,
        "student": cfg.student.name,
    }
    commit = git_commit()
    if commit:
        tags[tag.GIT_COMMIT] = commit
    return tags


def data_params(dataset: Dataset) -> dict[str, str | int]:
    """What the config cannot say about the data a run used: its fingerprint, whether it was streamed
    (``data.loader=auto`` decides at run time), and the unreadable images left out."""
    return {
        "data.fingerprint": dataset.fingerprint(),
        "data.streamed": str(dataset.streamed).lower(),
        "data.skipped_images": dataset.skipped,
    }


def run_experiment(
    cfg: ExperimentConfig, parent_run_id: str | None = None, role: str = "experiment"
) -> ExperimentResult:
    """Train (or reuse) every stage of ``cfg`` and record it all in MLflow.

    ``parent_run_id`` nests the experiment's run under another (a search's reference runs do that).

    If the newest run of this name and config did not finish (its driver was killed, or it failed),
    this call continues it: the same parent run, finished stages taken from the store, the interrupted
    stage resumed from its last checkpoint in its own child run.
    """
    check_device(cfg)
    check_writable(cfg)
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    dataset = load_dataset(cfg.data)
    check_models(cfg, dataset)
    check_decode_cpus(cfg, dataset)
    store = open_store(cfg.store)
    tags = {**run_tags(cfg), tag.CONFIG_HASH: model_key(cfg.dump())}
    name = run_name(cfg)
    parent, continuing, lease = claim_run(tracker, store, name, {**tags, tag.ROLE: role}, parent_run_id)
    result = ExperimentResult(parent)
    try:  # from here on, whatever fails ends the parent run FAILED (and the stage's run) and releases its lease
        with tracker.run(parent):
            earlier = tracker.children(parent) if continuing else {}
            plans = plan_stages(cfg, dataset.fingerprint(), owner=parent, info=model_info(dataset))
            runner = StageRunner(cfg, dataset, store, tracker)
            if not continuing:
                tracker.log_params(parent, flatten(cfg.dump()))
                tracker.log_text(parent, cfg.to_yaml(), "config.yaml")
            for plan in plans:
                previous = earlier.get(plan.key)
                stored = store.find(plan.key)
                if previous is not None and previous.info.status == "FINISHED" and stored is not None:
                    result.stages.append(StageOutcome(plan, stored, previous.info.run_id, True, stored.meta["metrics"]))
                    continue
                if previous is not None and previous.info.status != "FINISHED":  # interrupted: continue its run
                    child = previous.info.run_id
                    tracker.reopen(child)
                else:
                    child = tracker.start_run(plan.role, {**tags, tag.ROLE: plan.role, tag.MODEL_KEY: plan.key}, parent)
                with tracker.run(child, finish=False):  # the stage ends its run once its model is stored
                    result.stages.append(runner.run(plan, child))
            tracker.log_params(parent, data_params(dataset))
            tracker.log_metrics(parent, result.student.metrics, step=cfg.train.epochs)
    finally:
        lease.release()
    return result


def claim_run(
    tracker: Tracker, store: ModelStore, name: str, tags: dict[str, str], parent_run_id: str | None
) -> tuple[str, bool, StoreLock]:
    """The experiment's parent run, and whether it continues an unfinished one, with the run's lease held.

    The newest unfinished run of this name and config is continued, unless another live process holds its
    lease (a lock file in the model store, released by the OS when that process dies; in a bucket, a lease
    that expires once its holder stops renewing it): then this process
    opens its own run. Finding and leasing happen under one lock per config, so two processes started
    together never both take the same run."""
    lookup = {tag.ROLE: tags[tag.ROLE], tag.CONFIG_HASH: tags[tag.CONFIG_HASH]}
    if parent_run_id is not None:  # a search's reference: continue only a run of this search
        lookup[tag.PARENT_RUN_ID] = parent_run_id
    with store.lock(f"claim-{tags[tag.CONFIG_HASH]}"):
        unfinished = tracker.find_unfinished(name, lookup)
        if unfinished is not None:
            run_id = unfinished.info.run_id
            lease = store.lock(f"run-{run_id}")
            try:
                lease.acquire(timeout=0)
            except filelock.Timeout:
                log.info("run '%s' (%s) is in progress in another process: opening a new run", name, run_id)
            else:
                log.info("continuing the unfinished run '%s' (%s)", name, run_id)
                tracker.reopen(run_id)
                return run_id, True, lease
        parent = tracker.start_run(name, tags, parent_run_id)
        lease = store.lock(f"run-{parent}")
        lease.acquire()
        return parent, False, lease


def run_name(cfg: ExperimentConfig) -> str:
    return cfg.tracking.run_name or f"{cfg.method.name}-{cfg.student.name}"


def describe(result: ExperimentResult, cfg: ExperimentConfig) -> str:
    """A short table for the terminal: where each stage's model came from, and how well it does. Columns are as
    wide as their longest entry (a torchvision or timm name, a user's model path)."""
    rows = [("stage", "model", "key", "source", "val_acc", "test_acc")]
    for stage in result.stages:
        test = stage.metrics.get("test/acc")
        rows.append((
            stage.plan.role, stage.plan.model.name, stage.plan.key, stage.source,
            f"{stage.metrics['val/acc']:.4f}", f"{test:.4f}" if test is not None else "-",
        ))  # fmt: skip
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.rjust(width) if column >= 4 else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]
    lines.append(f"MLflow: run {result.parent_run_id} in experiment '{cfg.tracking.experiment}' at {cfg.tracking.uri}")
    lines.append(f"        view it with: {view_hint(cfg.tracking.uri)}")
    lines.append(f"Store:  {cfg.store.path}")
    return "\n".join(lines)
