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
from pathlib import Path
from typing import Any

import torch

from kdray.config import ExperimentConfig
from kdray.distributed import WorkerContext
from kdray.engine import FitResult, NullLogger, fit, model_info
from kdray.stages import StagePlan
from kdray.store import ModelStore

log = logging.getLogger(__name__)


FAULT_EPOCH = "KDRAY_FAULT_EPOCH"
FAULT_MARKER = "KDRAY_FAULT_MARKER"


class RayCheckpointer:
    """Reports every epoch to Ray Train; every K epochs (and the last) the chief adds the training state."""

    def __init__(self, ctx: WorkerContext, every: int, epochs: int) -> None:
        self.ctx = ctx
        self.every = every
        self.epochs = epochs
        self.resumed_from: int | None = None

    def restore(self) -> dict[str, Any] | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            state = os.path.join(folder, "state.pt")
            if not os.path.exists(state):  # the final report (weights only): nothing left to resume
                return None
            restored = torch.load(state, map_location=self.ctx.device, weights_only=True)
        self.resumed_from = restored["epoch"]
        return restored

    def save(self, epoch: int, state: dict[str, Any], metrics: dict[str, float]) -> None:
        import ray.train

        due = epoch % self.every == 0 or epoch == self.epochs
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if due and self.ctx.is_chief:
                torch.save(state, os.path.join(folder, "state.pt"))
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report({**metrics, "epoch": epoch}, checkpoint=checkpoint)
        inject_fault(epoch, self.ctx)


def inject_fault(epoch: int, ctx: WorkerContext) -> None:
    """Test hook: with KDRAY_FAULT_EPOCH=e and KDRAY_FAULT_MARKER=path set, the last worker kills its own
    process once, after epoch e (the marker file makes it happen once). Off unless both are set."""
    marker = os.environ.get(FAULT_MARKER)
    armed = marker and os.environ.get(FAULT_EPOCH) == str(epoch) and ctx.rank == ctx.world_size - 1
    if armed and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)


class SkipLogged:
    """After a restart, skip the epochs MLflow already holds, so the history has no repeated steps."""

    def __init__(self, inner: Any, logged_until: int) -> None:
        self.inner = inner
        self.logged_until = logged_until

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step > self.logged_until:
            self.inner.log_metrics(metrics, step)


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

        from kdray.tracking import MlflowRunLogger

        client = MlflowClient(tracking_uri=config["tracking_uri"])
        client.log_param(config["run_id"], "world_size", ctx.world_size)
        logged = client.get_metric_history(config["run_id"], "val/acc")
        logger = SkipLogged(MlflowRunLogger(client, config["run_id"]), max((m.step for m in logged), default=0))
    nodes: list[str | None] = [None] * ctx.world_size
    torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    if ctx.is_chief:
        client.log_param(config["run_id"], "worker_nodes", len(set(nodes)))
    checkpointer = RayCheckpointer(ctx, cfg.scaling.checkpoint_every, plan.train.epochs)
    result = fit(cfg, plan, dataset, guides, ctx, logger, wrap=ray.train.torch.prepare_model, checkpointer=checkpointer)
    if ctx.is_chief and checkpointer.resumed_from is not None:
        client.set_tag(config["run_id"], "kdray.resumed_from_epoch", str(checkpointer.resumed_from))
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if ctx.is_chief:
            torch.save(result.state_dict, os.path.join(folder, "model.pt"))
            Path(folder, "result.json").write_text(json.dumps({"history": result.history, "final": result.final}))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report({"val/acc": result.final["val/acc"]}, checkpoint=checkpoint)


def fit_on_ray(cfg: ExperimentConfig, plan: StagePlan, store_root: Path, tracking_uri: str, run_id: str) -> FitResult:
    """Train one stage on ``cfg.scaling.num_workers`` Ray Train workers and return the chief's result."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
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
    trainer = TorchTrainer(
        stage_worker,
        train_loop_config={
            "experiment": cfg.dump(),
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
            name=f"{run_id}-{plan.role}",
            storage_path=storage if "://" in storage else str(Path(storage).resolve()),
            failure_config=FailureConfig(max_failures=scaling.max_failures),
        ),
    )
    outcome = trainer.fit()
    assert outcome.checkpoint is not None, "the chief reported no checkpoint"
    with outcome.checkpoint.as_directory() as folder:
        state = torch.load(os.path.join(folder, "model.pt"), map_location="cpu", weights_only=True)
        saved = json.loads(Path(folder, "result.json").read_text())
    return FitResult(state_dict=state, history=saved["history"], final=saved["final"])
