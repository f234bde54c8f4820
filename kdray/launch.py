"""Ray Train: one stage on N data-parallel workers (``scaling.num_workers >= 1``).

The driver builds a ``TorchTrainer`` (Train V2) whose workers each run ``stage_worker``: the same
``build_stage`` and ``engine.fit`` an in-process run calls, with a ``WorkerContext`` from Ray Train
and the method wrapped in DDP by ``ray.train.torch.prepare_model`` (gloo on CPU, NCCL on GPU, chosen
by Ray from ``use_gpu``). Each worker trains on its own shard of the epoch's seeded permutation. Only
the chief (rank 0) writes: MLflow, checkpoints, and the finished model into the model store, before
its last report. Guides are read from the model store by every worker, so on several nodes the store
must be on shared storage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from ray.train import ControllerError, UserCallback

from kdray.data import load_dataset
from kdray.distributed import ray_train_context
from kdray.engine import TrainingDiverged
from kdray.images import DataError
from kdray.ray_session import connect_ray
from kdray.resolve import validate_config
from kdray.schema import ConfigError, ExperimentConfig
from kdray.sinks import RayTrainSink
from kdray.stage_worker import store_stage, train_stage
from kdray.stages import StagePlan
from kdray.store import open_store
from kdray.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)

NOT_RETRYABLE = (ConfigError, DataError, TrainingDiverged)


def data_parallel(cfg: ExperimentConfig) -> Callable[[torch.nn.Module], torch.nn.Module]:
    """DDP through Ray Train; with ``scaling.sync_batchnorm`` the BatchNorm layers first become
    SyncBatchNorm, so their statistics cover the global batch (frozen guides stay in eval mode, where
    SyncBatchNorm is plain BatchNorm)."""
    import ray.train.torch

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        if cfg.scaling.sync_batchnorm:
            module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return ray.train.torch.prepare_model(module)

    return wrap


class NoRetryOfBadInput(UserCallback):
    """Ends a Ray Train run at once when a worker fails in a way a restart repeats: bad input found on the worker
    (``ConfigError``, ``DataError``) or a diverged loss (same seed, same checkpoint, same NaN).

    Train V2's failure policy retries every worker error up to ``FailureConfig.max_failures``; an error raised
    from a controller callback is not retried. The driver re-raises the worker's error (``fit_on_ray``)."""

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for error in worker_exceptions.values():
            if isinstance(error, NOT_RETRYABLE):
                raise error


def stage_worker(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: rebuild the inputs from plain data, train, report."""
    import ray

    cfg = validate_config(config["experiment"])
    plan = StagePlan.model_validate(config["plan"])
    run_id = config["run_id"]
    ctx = ray_train_context(cfg.scaling.threads)
    dataset = load_dataset(cfg.data)
    store = open_store(cfg.store)
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment) if ctx.is_chief else NullTracker()
    nodes: list[str | None] = [None] * ctx.world_size
    torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    tracker.log_params(run_id, {"world_size": ctx.world_size, "worker_nodes": len(set(nodes))})
    sink = RayTrainSink(
        ctx,
        tracker.continuing_logger(run_id),
        partial(store_stage, cfg, plan, store, tracker, run_id, dataset) if ctx.is_chief else None,
        cfg.scaling.checkpoint_every,
        plan.train.epochs,
        every_rank=cfg.scaling.parallelism == "branches",
    )
    train_stage(cfg, plan, dataset, store, tracker, run_id, ctx, sink, wrap=data_parallel(cfg))


def fit_on_ray(
    cfg: ExperimentConfig, plan: StagePlan, run_id: str, name: str, callbacks: list[Any] | None = None
) -> None:
    """Train one stage on ``cfg.scaling.num_workers`` Ray Train workers; the chief stores the model.

    The Train run is called ``name`` under ``scaling.storage_path``: a rerun of an interrupted stage
    finds its checkpoints there and continues from the latest. ``callbacks`` are Ray Train's (a search
    trial passes ``TuneReportCallback``, so its scheduler hears every epoch).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    connect_ray()
    scaling = cfg.scaling
    if len([node for node in ray.nodes() if node["Alive"]]) > 1 and "://" not in scaling.storage_path:
        log.warning(
            "scaling.storage_path=%s is a local path on a cluster of several nodes: checkpoints and restores need "
            "storage every node reaches (s3://..., gs://..., or an NFS mount); the model store does too (store.path)",
            scaling.storage_path,
        )
    use_gpu = scaling.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    if scaling.sync_batchnorm and not use_gpu:
        raise ConfigError("scaling.sync_batchnorm: the Ray cluster has no GPUs and SyncBatchNorm runs on CUDA only")
    trainer = TorchTrainer(
        stage_worker,
        train_loop_config={"experiment": cfg.dump(), "plan": plan.model_dump(mode="json"), "run_id": run_id},
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=scaling.resources_per_worker or None,
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=scaling.storage_path,
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=scaling.keep_checkpoints),
            callbacks=[NoRetryOfBadInput(), *(callbacks or [])],
        ),
    )
    try:
        trainer.fit()
    except ControllerError as error:  # NoRetryOfBadInput stopped it: the worker's own one-line error
        if isinstance(error.controller_failure, NOT_RETRYABLE):
            raise error.controller_failure from None
        raise
