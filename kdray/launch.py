"""Ray Train: one stage's ``fit`` on N data-parallel workers (``scaling.num_workers >= 1``).

The driver builds a ``TorchTrainer`` (Train V2) whose workers each run ``stage_worker``: the same
``engine.fit`` an in-process run calls, with a ``WorkerContext`` from ``ray.train.get_context()`` and
the method wrapped in DDP by ``ray.train.torch.prepare_model`` (gloo on CPU, NCCL on GPU, chosen by
Ray from ``use_gpu``). Each worker trains on its own shard of the epoch's seeded permutation. Only
the chief (rank 0) logs to MLflow and reports the trained weights as a Ray checkpoint; the driver
then puts them in the model store. Guides are read from the model store by every worker, so on
several nodes the store must be on shared storage.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kdray.config import ConfigError, ExperimentConfig
from kdray.distributed import WorkerContext
from kdray.engine import FitResult, NullLogger, fit, model_info
from kdray.guide_cache import anchored
from kdray.stages import StagePlan
from kdray.store import ModelStore

# Train V2 holds at most one unread report per worker and its controller reads them every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default), so each per-epoch report could block a worker for
# up to 2 s: on digits that tripled a 15-epoch run (27 s of reports for 6 s of training). A quarter
# second costs the controller a few polls a second. The user's own setting of the variable wins.
REPORT_POLL_INTERVAL_S = "0.25"

log = logging.getLogger(__name__)


FAULT_EPOCH = "KDRAY_FAULT_EPOCH"
FAULT_MARKER = "KDRAY_FAULT_MARKER"


class RayCheckpointer:
    """Reports every epoch to Ray Train; every K epochs (and the last) adds the training state.

    ``api="tune"`` reports to Ray Tune instead, from a search trial that trains in its own process.
    The chief's state is the whole state in data-parallel runs (DDP keeps the replicas equal). With
    branch parallelism every worker owns a different branch, so each writes its own ``state-<rank>.pt``;
    Ray Train merges the workers' files into one checkpoint folder.
    """

    def __init__(
        self, ctx: WorkerContext, every: int, epochs: int, every_rank: bool = False, api: str = "train"
    ) -> None:
        self.ctx = ctx
        self.api = api
        self.every = every
        self.epochs = epochs
        self.every_rank = every_rank
        self.file = f"state-{ctx.rank}.pt" if every_rank else "state.pt"
        self.resumed_from: int | None = None

    def _ray(self) -> Any:
        import ray.train
        import ray.tune

        return ray.tune if self.api == "tune" else ray.train

    def restore(self) -> dict[str, Any] | None:
        checkpoint = self._ray().get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            state = os.path.join(folder, self.file)
            if not os.path.exists(state):  # the final report (weights only): nothing left to resume
                return None
            restored = torch.load(state, map_location=self.ctx.device, weights_only=True)
        self.resumed_from = restored["epoch"]
        return restored

    def save(self, epoch: int, state: dict[str, Any], metrics: dict[str, float]) -> None:
        """Report the epoch (and, when due, the state). In a search the final epoch is not reported to Tune
        from here: the trial reports it once the model is stored, so a scheduler's stop cannot come between
        the last epoch and the store (``kdray_final`` tells Train-to-Tune forwarding which reports to pass)."""
        if self.api == "tune" and epoch == self.epochs:
            return
        ray = self._ray()
        metrics = {**metrics, "epoch": epoch, "kdray_final": float(epoch == self.epochs)}
        due = epoch % self.every == 0 or epoch == self.epochs
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if due and (self.ctx.is_chief or self.every_rank):
                torch.save(state, os.path.join(folder, self.file))
                checkpoint = ray.Checkpoint.from_directory(folder)
            ray.report(metrics, checkpoint=checkpoint)
        inject_fault(epoch, self.ctx)


def inject_fault(epoch: int, ctx: WorkerContext) -> None:
    """Test hook: with KDRAY_FAULT_EPOCH=e and KDRAY_FAULT_MARKER=path set, the last worker kills its own
    process once, after epoch e (the marker file makes it happen once). Off unless both are set."""
    marker = os.environ.get(FAULT_MARKER)
    armed = marker and os.environ.get(FAULT_EPOCH) == str(epoch) and ctx.rank == ctx.world_size - 1
    if armed and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)


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


def stage_worker(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: rebuild the inputs from plain data, train, report."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = ExperimentConfig.model_validate(config["experiment"])
    plan = StagePlan.model_validate(config["plan"])
    context = ray.train.get_context()
    ctx = WorkerContext(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device())
    if cfg.scaling.threads:
        torch.set_num_threads(cfg.scaling.threads)
    from kdray.data import load_dataset

    dataset = load_dataset(cfg.data)
    store = ModelStore(config["store"])
    guides = [store.load(key, model_info(dataset)) for key in plan.guides]
    logger: Any = NullLogger()
    if ctx.is_chief:
        from mlflow.tracking import MlflowClient

        from kdray.tracking import MlflowRunLogger, SkipLogged, logged_until

        client = MlflowClient(tracking_uri=config["tracking_uri"])
        client.log_param(config["run_id"], "world_size", ctx.world_size)
        logger = SkipLogged(MlflowRunLogger(client, config["run_id"]), logged_until(client, config["run_id"]))
    nodes: list[str | None] = [None] * ctx.world_size
    torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    if ctx.is_chief:
        client.log_param(config["run_id"], "worker_nodes", len(set(nodes)))
    every_rank = cfg.scaling.parallelism == "branches"
    checkpointer = RayCheckpointer(ctx, cfg.scaling.checkpoint_every, plan.train.epochs, every_rank)
    result = fit(cfg, plan, dataset, guides, ctx, logger, wrap=data_parallel(cfg), checkpointer=checkpointer)
    if ctx.is_chief and checkpointer.resumed_from is not None:
        client.set_tag(config["run_id"], "kdray.resumed_from_epoch", str(checkpointer.resumed_from))
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if ctx.is_chief:
            torch.save(result.state_dict, os.path.join(folder, "model.pt"))
            Path(folder, "result.json").write_text(json.dumps({"history": result.history, "final": result.final}))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report({"val/acc": result.final["val/acc"]}, checkpoint=checkpoint)


def _forward_epochs_class() -> type:
    from ray.tune.integration.ray_train import TuneReportCallback

    class ForwardEpochs(TuneReportCallback):
        """Ray Train's bridge to Tune, passing the chief's per-epoch reports except the final one."""

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if metrics and metrics[0].get("kdray_final") == 0.0:
                super().after_report(run_context, metrics, checkpoint)

    return ForwardEpochs


def connect_ray(log_to_driver: bool = True) -> None:
    """Join the cluster at ``RAY_ADDRESS``, or start a local one, unless this process is already connected.

    The dashboard stays on: Ray Train V2 frees the placement group of a run whose controller was killed
    (a search trial stopped by ASHA) through the State API, which the dashboard serves. Without it the
    stopped trial's workers keep their CPUs/GPUs and the next trial's workers wait for them forever.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=True, log_to_driver=log_to_driver)


def fit_on_ray(
    cfg: ExperimentConfig,
    plan: StagePlan,
    store_root: Path,
    tracking_uri: str,
    run_id: str,
    folder_name: str,
    report_to_tune: bool = False,
) -> FitResult:
    """Train one stage on ``cfg.scaling.num_workers`` Ray Train workers and return the chief's result.

    The Train run is named ``folder_name`` (run name + stage key) under ``scaling.storage_path``: a
    rerun of an interrupted experiment finds its checkpoints there and continues from the latest.
    ``report_to_tune``: called from a search trial; the chief's epoch reports are forwarded to Tune.
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ForwardEpochs = _forward_epochs_class()  # noqa: N806

    connect_ray()
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", REPORT_POLL_INTERVAL_S)  # read by TorchTrainer()
    scaling = cfg.scaling
    storage = scaling.storage_path
    if len([node for node in ray.nodes() if node["Alive"]]) > 1 and "://" not in storage:
        log.warning(
            "scaling.storage_path=%s is a local path on a cluster of several nodes: checkpoints and restores need "
            "storage every node reaches (s3://..., gs://..., or an NFS mount); the model store does too (store.path)",
            storage,
        )
    use_gpu = scaling.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    if scaling.sync_batchnorm and not use_gpu:
        raise ConfigError("scaling.sync_batchnorm: the Ray cluster has no GPUs and SyncBatchNorm runs on CUDA only")
    trainer = TorchTrainer(
        stage_worker,
        train_loop_config={
            "experiment": anchored(cfg, store_root).dump(),
            "plan": plan.model_dump(mode="json"),
            "store": str(store_root),
            "tracking_uri": tracking_uri,
            "run_id": run_id,
        },
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=scaling.resources_per_worker or None,
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=folder_name,
            storage_path=storage if "://" in storage else str(Path(storage).resolve()),
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            callbacks=[ForwardEpochs()] if report_to_tune else None,
        ),
    )
    outcome = trainer.fit()
    assert outcome.checkpoint is not None, "the chief reported no checkpoint"
    with outcome.checkpoint.as_directory() as folder:
        state = torch.load(os.path.join(folder, "model.pt"), map_location="cpu", weights_only=True)
        saved = json.loads(Path(folder, "result.json").read_text())
    return FitResult(state_dict=state, history=saved["history"], final=saved["final"])
