"""A finished stage into the model store, then into its MLflow run: what the process that trained it does last,
in-process (``kdray.stage_runner``) or as the chief of Ray Train workers (``kdray.launch``)."""

from __future__ import annotations

import kdray
from kdray import tag_names as tag
from kdray.build import model_info
from kdray.data import Dataset
from kdray.engine import FitResult
from kdray.given import Stats
from kdray.models.deploy import Classifier
from kdray.schema import ExperimentConfig
from kdray.stages import StagePlan
from kdray.store import ModelStore, StoredModel
from kdray.tracking import Tracker


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
