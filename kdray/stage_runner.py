"""One stage loop, used by ``kdray train`` and by every search trial: reuse, lock, resume, train, store.

Each stage runs under the model store's lock on its key. Whoever holds it either finds the model
stored (reuse: the stage's run is tagged with the run that trained it) or trains it; everyone else
waits and then finds it. So two ``kdray train`` runs, or two trials, that share a teacher train it
once. An interrupted stage continues from its last checkpoint, wherever it was interrupted: the
checkpoints of a stage live under ``scaling.storage_path/stage-<key>``, so a rerun, another run
with the same teacher or a resumed search finds them. A search trial's own student is the one
exception in how its epochs are reported: to Ray Tune (``TuneTrial``), whose scheduler reads them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from kdray import run_storage
from kdray import tag_names as tag
from kdray.build import model_info
from kdray.data import Dataset, on_device
from kdray.distributed import WorkerContext, local_context
from kdray.engine import FitResult, evaluate
from kdray.given import given_model
from kdray.models.deploy import restandardized
from kdray.schema import ExperimentConfig
from kdray.sinks import BucketSink, LocalSink, StageSink, StoreResult, TuneSink
from kdray.stage_worker import log_stored_model, store_stage, train_stage
from kdray.stages import StagePlan
from kdray.store import ModelStore, StoredModel
from kdray.tracking import MetricLogger, Tracker

log = logging.getLogger(__name__)


@dataclass
class StageOutcome:
    plan: StagePlan
    stored: StoredModel
    run_id: str
    reused: bool
    metrics: dict[str, float]

    @property
    def source(self) -> str:
        """Where this run's model came from: ``reused`` from the store, ``given`` (weights evaluated, not
        trained) or ``trained``."""
        if self.reused:
            return "reused"
        return "given" if self.plan.weights is not None else "trained"


class FileCheckpoints:
    """How ordinary stages report: checkpoints under ``scaling.storage_path/stage-<key>`` (a file in
    process, the Ray Train run of that name on workers), metrics to MLflow only."""

    def sink(
        self, cfg: ExperimentConfig, plan: StagePlan, ctx: WorkerContext, logger: MetricLogger, store: StoreResult
    ) -> StageSink:
        root, every = cfg.scaling.storage_path, cfg.scaling.checkpoint_every
        if run_storage.is_uri(root):
            folder = run_storage.join(root, self.train_run_name(plan))
            return BucketSink(folder, logger, store, every, plan.train.epochs, ctx.device)
        folder = Path(root) / self.train_run_name(plan)
        return LocalSink(folder, logger, store, every, plan.train.epochs, ctx.device)

    def train_run_name(self, plan: StagePlan) -> str:
        return f"stage-{plan.key}"

    def train_callbacks(self) -> list[Any]:
        return []


class TuneTrial(FileCheckpoints):
    """How a search trial's student reports: every epoch to Ray Tune, which checkpoints the trial itself (in
    process) or hears the Ray Train run's reports through ``TuneReportCallback``."""

    def __init__(self, trial_name: str) -> None:
        self.trial_name = trial_name

    def sink(
        self, cfg: ExperimentConfig, plan: StagePlan, ctx: WorkerContext, logger: MetricLogger, store: StoreResult
    ) -> StageSink:
        return TuneSink(ctx, logger, store, cfg.scaling.checkpoint_every, plan.train.epochs)

    def train_run_name(self, plan: StagePlan) -> str:
        return f"{self.trial_name}-{plan.key}"

    def train_callbacks(self) -> list[Any]:
        from ray.tune.integration.ray_train import TuneReportCallback

        return [TuneReportCallback()]


def stage_params(plan: StagePlan) -> dict[str, Any]:
    """The stage's own recipe as MLflow params (the experiment's parent run holds the whole config)."""
    return {
        **{f"model.{k}": v for k, v in plan.model.model_dump().items()},
        **{f"train.{k}": v for k, v in plan.train.model_dump().items()},
        "guides": ",".join(plan.guides) or "-",
        **{f"method.{k}": v for k, v in plan.method.model_dump().items()},
    }


class StageRunner:
    """Trains or reuses the stages of one experiment (or one trial) against one store and one tracker."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        dataset: Dataset,
        store: ModelStore,
        tracker: Tracker,
        ctx: WorkerContext | None = None,
    ) -> None:
        self.cfg = cfg
        self.dataset = dataset
        self.store = store
        self.tracker = tracker
        self._ctx = ctx

    @functools.cached_property
    def ctx(self) -> WorkerContext:
        """The device and threads of stages trained or evaluated in this process, made when first needed (a run
        on Ray Train workers never needs one: each worker makes its own)."""
        return self._ctx or local_context(self.cfg.scaling.use_gpu, self.cfg.scaling.threads)

    def run(self, plan: StagePlan, run_id: str, reporting: FileCheckpoints | None = None) -> StageOutcome:
        """Train ``plan`` into MLflow run ``run_id`` and the store, or take it from the store; the run ends
        FINISHED either way."""
        with self.store.lock(plan.key):
            stored = self.store.find(plan.key)
            if stored is None:
                return self.train(plan, run_id, reporting or FileCheckpoints())
        return self.reuse(plan, stored, run_id)

    def train_missing(self, plan: StagePlan, open_run: Callable[[], str]) -> StageOutcome | None:
        """Train ``plan`` unless the store holds it (then None); its MLflow run is opened (``open_run``) only
        when it trains, so a search records each shared teacher once, not once per trial, and ends FAILED if
        the training raises."""
        with self.store.lock(plan.key):
            if self.store.find(plan.key) is not None:
                return None
            with self.tracker.run(open_run(), finish=False) as run_id:  # the stage ends it once stored
                return self.train(plan, run_id, FileCheckpoints())

    def train_guides(self, plans: list[StagePlan], parent: str, tags: dict[str, str]) -> dict[str, int]:
        """Each guide of ``plans`` the store lacks, trained in a new run under ``parent`` (``tags`` plus its role
        and key); how many were trained and how many the store already held."""
        counts = {"trained": 0, "reused": 0}
        for plan in plans:

            def open_run(plan: StagePlan = plan) -> str:
                return self.tracker.start_run(plan.role, {**tags, tag.ROLE: plan.role, tag.MODEL_KEY: plan.key}, parent)

            outcome = self.train_missing(plan, open_run)
            counts["reused" if outcome is None else "trained"] += 1
        return counts

    def _log_params(self, run_id: str, plan: StagePlan) -> None:
        """The stage's params on its run. A search trial's student stage runs in the trial's run, which holds
        the trial's config: where the stage is planned in a plainer equivalent form (takd at depth 0 trains
        kd's student), the trial's values stay the params and the stage's go to ``kdray.stage.*`` tags."""
        params = {key: str(value)[:6000] for key, value in stage_params(plan).items()}
        held = self.tracker.params(run_id)
        self.tracker.log_params(run_id, {key: value for key, value in params.items() if key not in held})
        differ = {f"{tag.STAGE_PREFIX}{key}": value for key, value in params.items() if held.get(key, value) != value}
        if differ:
            self.tracker.set_tags(run_id, differ)

    def reuse(self, plan: StagePlan, stored: StoredModel, run_id: str) -> StageOutcome:
        log.info("%-8s %s reused from the model store (%s)", plan.role, plan.model.name, plan.key)
        self._log_params(run_id, plan)
        source = str(stored.meta.get("mlflow_run_id", ""))
        self.tracker.set_tags(run_id, {tag.REUSED: "true", tag.SOURCE_RUN_ID: source})
        if not self.tracker.has_run(source):  # trained under another tracking store: loadable from this one too
            here = [run for run in self.tracker.runs({tag.MODEL_KEY: plan.key}) if tag.MODEL_ID in run.data.tags]
            if here:  # an earlier reuse here logged it already
                self.tracker.set_tags(run_id, {tag.MODEL_ID: here[0].data.tags[tag.MODEL_ID]})
            else:
                log_stored_model(self.tracker, run_id, self.store, stored, self.dataset)
        # A restored trial's run may hold them already. One that holds only some epochs of its own (its process
        # died, then an identical trial stored the model) gets the stored model's as its last epoch: its latest
        # val/* must be the model's it now stands for, not those of its own unfinished training.
        logged = self.tracker.latest_metrics(run_id)
        partly = self.tracker.logged_until(run_id) < plan.train.epochs
        missing = {k: v for k, v in stored.meta["metrics"].items() if partly or k not in logged}
        self.tracker.log_metrics(run_id, missing, step=plan.train.epochs)
        self.tracker.end_run(run_id)
        return StageOutcome(plan, stored, run_id, True, stored.meta["metrics"])

    def train(self, plan: StagePlan, run_id: str, reporting: FileCheckpoints) -> StageOutcome:
        """Train (the caller holds the stage's lock) into the store; the run ends FINISHED."""
        self._log_params(run_id, plan)
        if plan.weights is not None:
            return self.evaluate_given(plan, run_id)
        log.info("%-8s %s: training %d epochs (store key %s)", plan.role, plan.model.name, plan.train.epochs, plan.key)
        store = partial(store_stage, self.cfg, plan, self.store, self.tracker, run_id, self.dataset)
        if self.cfg.scaling.on_ray_train:  # each Ray Train worker calls train_stage
            from kdray.launch import fit_on_ray  # lazy: ray.train costs in-process runs about a second to import

            fit_on_ray(self.cfg, plan, run_id, reporting.train_run_name(plan), reporting.train_callbacks())
        else:
            sink = reporting.sink(self.cfg, plan, self.ctx, self.tracker.continuing_logger(run_id), store)
            train_stage(self.cfg, plan, self.dataset, self.store, self.tracker, run_id, self.ctx, sink)
        stored = self.store.find(plan.key)
        assert stored is not None, f"{plan.role} finished without storing its model"
        return StageOutcome(plan, stored, run_id, False, stored.meta["metrics"])

    def evaluate_given(self, plan: StagePlan, run_id: str) -> StageOutcome:
        """A given model (``teacher.weights``): evaluated on val and test, stored, never trained."""
        cfg = self.cfg
        given = given_model(cfg, plan.role, plan.model, model_info(self.dataset))
        ctx = self.ctx
        data_stats = (self.dataset.mean, self.dataset.std)
        model = restandardized(given.model, data_stats, given.stats or data_stats).to(ctx.device)
        final: dict[str, float] = {}
        for name, split in (("val", self.dataset.val), ("test", self.dataset.test)):
            if split is not None:
                source = on_device(split, self.dataset.mean, self.dataset.std, ctx.device, cfg.data)
                values = evaluate(model, source, cfg.train.eval_batch_size, ctx)  # type: ignore[arg-type]
                final.update({f"{name}/{metric}": value for metric, value in values.items()})
        log.info("%-8s %s given (%s): val_acc %.4f", plan.role, plan.model.name, plan.weights, final["val/acc"])
        self.tracker.set_tags(run_id, {tag.GIVEN_WEIGHTS: str(plan.weights)})
        self.tracker.log_metrics(run_id, {k: v for k, v in final.items() if k.startswith("val/")}, step=0)
        state = {name: tensor.cpu() for name, tensor in given.model.state_dict().items()}
        store_stage(cfg, plan, self.store, self.tracker, run_id, self.dataset, FitResult(state, [], final), given.stats)
        stored = self.store.find(plan.key)
        assert stored is not None
        return StageOutcome(plan, stored, run_id, False, final)
