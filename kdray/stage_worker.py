"""What a process that trains a stage does, on both routes: in this process (``kdray.stage_runner``) or as
each Ray Train worker (``kdray.launch.stage_worker``). ``train_stage`` loads the guides from the store,
builds the stage and runs the epoch loop into a sink; ``store_stage`` is what the sink hands the finished
model to: the model store first, then its MLflow run.

Which route a stage takes is decided once, by ``StageRunner.train`` (``scaling.num_workers``). The model is
stored from the sink's ``end_stage``, before the last epoch is reported: on Ray the last report can end the
worker (a Tune scheduler's stop), and the weights exist only on the worker, so storing after the stage
would mean shipping them back through a Ray checkpoint first.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import kdray
from kdray import tag_names as tag
from kdray.build import build_stage, model_info
from kdray.data import Dataset
from kdray.distributed import WorkerContext
from kdray.engine import FitResult, fit
from kdray.given import Stats
from kdray.models.deploy import Classifier
from kdray.schema import ExperimentConfig
from kdray.sinks import StageSink
from kdray.stages import StagePlan
from kdray.store import ModelStore, StoredModel
from kdray.tracking import Tracker


def train_stage(
    cfg: ExperimentConfig,
    plan: StagePlan,
    dataset: Dataset,
    store: ModelStore,
    tracker: Tracker,
    run_id: str,
    ctx: WorkerContext,
    sink: StageSink,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
) -> None:
    """Train ``plan`` in this process (one of ``ctx.world_size`` workers, the method wrapped in DDP by ``wrap``),
    its guides read from ``store``, every epoch into ``sink``; a continued stage is tagged on its run."""
    stats = (dataset.mean, dataset.std)
    guides = [store.load_guide(key, model_info(dataset), stats) for key in plan.guides]
    fit(build_stage(cfg, plan, dataset, guides, ctx, wrap=wrap), sink)
    if sink.resumed_from is not None:
        tracker.set_tags(run_id, {tag.RESUMED_FROM_EPOCH: str(sink.resumed_from)})


def store_stage(
    cfg: ExperimentConfig,
    plan: StagePlan,
    store: ModelStore,
    tracker: Tracker,
    run_id: str,
    dataset: Dataset,
    result: FitResult,
    stats: Stats | None = None,
) -> None:
    """Put a finished stage in the model store, then finish its MLflow run (test metrics, weights, config, and
    the model as an MLflow model that takes [0, 1] images).

    The store comes first, so a tracking failure never loses a trained model. ``stats``: the input statistics
    the model expects (a given model's own; default: the data's)."""
    mean, std = stats or (dataset.mean, dataset.std)
    meta = {
        "model": plan.model.model_dump(),
        "role": plan.role,
        "method": plan.method.model_dump(),
        "guides": plan.guides,
        "identity": plan.identity,
        "metrics": result.final,
        "mlflow_run_id": run_id,
        "kdray_version": kdray.__version__,
        "input_stats": {"mean": list(mean), "std": list(std)},
        "image_shape": [dataset.in_channels, dataset.image_size, dataset.image_size],
        "classes": dataset.classes,
    }
    if plan.weights is not None:
        meta["weights"] = plan.weights
    stored = store.save(plan.key, result.state_dict, cfg.to_yaml(), meta)
    tracker.set_tags(run_id, {tag.REUSED: "false"})
    # val/* is logged already, and so is test/* when evaluated every epoch; best_epoch* is new.
    logged = result.history[-1] if result.history else {}
    new = {name: value for name, value in result.final.items() if not name.startswith("val/") and name not in logged}
    tracker.log_metrics(run_id, new, step=plan.train.epochs)
    log_stored_model(tracker, run_id, store, stored, dataset)
    tracker.end_run(run_id)


def log_stored_model(tracker: Tracker, run_id: str, store: ModelStore, stored: StoredModel, dataset: Dataset) -> None:
    """A stored model's weights and config as artifacts of run ``run_id``, and the model as an MLflow model that
    takes [0, 1] images (tag ``kdray.model_id``), standardising with the input statistics it was stored with."""
    tracker.log_artifact(run_id, stored.weights)
    tracker.log_artifact(run_id, stored.path / "config.yaml")
    stats = stored.meta.get("input_stats") or {"mean": dataset.mean, "std": dataset.std}
    model = store.load(stored.key, model_info(dataset))
    shape = (dataset.in_channels, dataset.image_size, dataset.image_size)
    deployed = Classifier(model, tuple(stats["mean"]), tuple(stats["std"]), classes=dataset.classes, image_shape=shape)
    model_id = tracker.log_model(run_id, deployed, shape)
    if model_id:
        tracker.set_tags(run_id, {tag.MODEL_ID: model_id})
