"""The training loop: one stage (a model, a method, its guides) from initialisation to metrics.

The loop takes everything about its process from a ``WorkerContext`` and writes metrics through a
``MetricLogger``, so a Ray Train worker can run it unchanged. Per-step work stays on the device:
loss terms are accumulated as tensors and read back once per epoch (a ``.item()`` per step would
stall the GPU every step).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from kdray.config import ExperimentConfig, TrainConfig
from kdray.data import Dataset, DeviceSplit, eval_batches, train_batches
from kdray.data.augment import view_count
from kdray.distributed import WorkerContext, all_reduce_sum
from kdray.guide_cache import GuideCache
from kdray.methods import METHODS, Method, StepInfo
from kdray.methods.ensemble import EnsembleMethod
from kdray.models import ModelInfo, StagedNet, build_model
from kdray.stages import StagePlan

log = logging.getLogger(__name__)


class MetricLogger(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


class NullLogger:
    """For workers that do not write (rank > 0) and for runs without tracking."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        return None


class Checkpointer(Protocol):
    """Where a stage's training state goes at the end of an epoch, and comes back from after a failure."""

    resumed_from: int | None

    def restore(self) -> dict[str, Any] | None: ...

    def save(self, epoch: int, state: dict[str, Any], metrics: dict[str, float]) -> None: ...


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class FitResult:
    state_dict: dict[str, torch.Tensor]
    history: list[dict[str, float]] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)


def model_info(dataset: Dataset) -> ModelInfo:
    return ModelInfo(dataset.num_classes, dataset.in_channels, dataset.image_size)


def build_optimizer(
    params: Sequence[torch.nn.Parameter], train: TrainConfig, world_size: int = 1
) -> torch.optim.Optimizer:
    """SGD or AdamW at the peak LR; ``lr_scaling: linear`` multiplies it by the number of workers,
    the linear scaling rule of Goyal et al. (2017) for a global batch ``world_size`` times larger."""
    lr = train.lr * (world_size if train.lr_scaling == "linear" else 1)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(train.momentum, 0.999), weight_decay=train.weight_decay)
    return torch.optim.SGD(
        params, lr=lr, momentum=train.momentum, nesterov=train.nesterov, weight_decay=train.weight_decay
    )


def lr_factor(train: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the peak LR at each optimiser step: linear warm-up, then the schedule by epoch."""
    warmup_steps = train.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        epoch = step / steps_per_epoch
        if train.schedule == "step":
            return train.gamma ** (int(epoch) // train.step_size)
        if train.schedule == "multistep":
            return train.gamma ** sum(int(epoch) >= m for m in train.milestones)
        if train.schedule == "cosine":
            done = (step - warmup_steps) / max(1, train.epochs * steps_per_epoch - warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * done))
        return 1.0

    return factor


def autocast_dtype(ctx: WorkerContext, enabled: bool) -> torch.dtype | None:
    """Mixed precision on CUDA: bf16 where the GPU supports it (no loss scaling needed), else fp16."""
    if not (enabled and ctx.device.type == "cuda"):
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(ctx: WorkerContext, enabled: bool) -> tuple[contextlib.AbstractContextManager, torch.amp.GradScaler]:
    dtype = autocast_dtype(ctx, enabled)
    if dtype is None:
        return contextlib.nullcontext(), torch.amp.GradScaler("cuda", enabled=False)
    return torch.autocast("cuda", dtype=dtype), torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


def memory_format(ctx: WorkerContext, train: TrainConfig) -> torch.memory_format:
    """channels_last (NHWC) on GPUs, where convolutions run faster in it; contiguous NCHW on CPU."""
    return torch.channels_last if train.channels_last and ctx.device.type == "cuda" else torch.contiguous_format


def guide_cache(cfg: ExperimentConfig, dataset: Dataset, ctx: WorkerContext, train: TrainConfig) -> GuideCache:
    """The guide-output cache of a stage, keyed by everything that decides a guide's logits but its weights."""
    augment = cfg.data.augment
    device = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"
    data_identity = {
        "data": dataset.fingerprint(),
        "augment": augment.model_dump(mode="json"),
        "normalise": [list(dataset.mean), list(dataset.std)],
        "compute": [device, str(autocast_dtype(ctx, train.amp) or torch.float32), str(memory_format(ctx, train))],
    }
    shape = (len(dataset.train), view_count(augment.padding, augment.flip), dataset.num_classes)
    folder = cfg.guide_cache.folder(cfg.store.path)
    return GuideCache(cfg.guide_cache, folder, data_identity, shape, ctx.device)


@torch.no_grad()
def evaluate(
    model: StagedNet,
    split: DeviceSplit,
    batch_size: int,
    ctx: WorkerContext,
    extra: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]] | None = None,
) -> dict[str, float]:
    """Accuracy and mean cross-entropy over the whole split (all workers' shards summed).

    ``extra`` returns further per-sample statistics (a method's ``eval_terms``), averaged the same way.
    """
    was_training = model.training
    model.eval()
    names = ["loss", "acc"]
    totals: torch.Tensor | None = None
    count = 0
    for batch in eval_batches(split, batch_size, ctx.rank, ctx.world_size):
        logits = model(batch.images).float()
        columns = [
            F.cross_entropy(logits, batch.labels, reduction="none"),
            (logits.argmax(1) == batch.labels).double(),
        ]
        if extra is not None:
            terms = extra(batch.images, batch.labels)
            names = ["loss", "acc", *terms]
            columns += list(terms.values())
        sums = torch.stack([column.double().sum() for column in columns])
        totals = sums if totals is None else totals + sums
        count += len(batch.labels)
    model.train(was_training)
    assert totals is not None
    counted = all_reduce_sum(torch.cat([totals, totals.new_tensor([count])]), ctx).tolist()
    return {name: value / counted[-1] for name, value in zip(names, counted[:-1], strict=True)}


def guide_metrics(method: Method) -> dict[str, float]:
    """This worker's guide work in the epoch: images the guides ran on, and the cache's hits and misses."""
    if not method.guides:
        return {}
    metrics = {"guide/forward_images": float(method.guide_images)}
    method.guide_images = 0
    if method.guide_cache is not None:
        metrics.update(method.guide_cache.epoch_metrics())
    return metrics


def fit(
    cfg: ExperimentConfig,
    plan: StagePlan,
    dataset: Dataset,
    guides: Sequence[StagedNet],
    ctx: WorkerContext,
    logger: MetricLogger | None = None,
    wrap: Callable[[Method], torch.nn.Module] | None = None,
    checkpointer: Checkpointer | None = None,
) -> FitResult:
    """Train ``plan.model`` by ``plan.method`` with ``plan.train``; evaluate on val each epoch, test at the end.

    ``wrap`` prepares the method for data-parallel training (Ray Train's ``prepare_model`` wraps it in
    DDP, so the student and any extra trainable modules are synchronised; frozen guides have no
    gradients and DDP leaves them alone). Evaluation and storing use the unwrapped method.
    ``checkpointer`` receives the full training state after every epoch and, on a restart after a
    failure, gives the last one back: training continues from the epoch after it.
    """
    logger = logger or NullLogger()
    train_cfg = plan.train
    epochs = train_cfg.epochs
    torch.manual_seed(train_cfg.seed)
    info = replace(model_info(dataset), onthefly=plan.model.onthefly, batchnorm=plan.model.batchnorm)
    student = build_model(plan.model.name, info)
    layout = memory_format(ctx, train_cfg)
    method: Method = METHODS[plan.method.name](student, guides, plan.method).to(ctx.device, memory_format=layout)
    if guides and cfg.guide_cache.enabled:
        method.guide_cache = guide_cache(cfg, dataset, ctx, train_cfg)
    if train_cfg.compile:
        for model in (student, *guides):
            model.compile()
    # Branch parallelism: this worker keeps one branch and every worker sees the whole batch stream,
    # so batches and evaluation use a one-worker view of the data (``shard``).
    ensemble = method if isinstance(method, EnsembleMethod) else None
    peers = ensemble is not None and cfg.scaling.parallelism == "branches" and ctx.world_size > 1
    if peers:
        ensemble.split_across(ctx.rank, ctx.world_size)  # type: ignore[union-attr]
    shard = replace(ctx, rank=0, world_size=1) if peers else ctx
    loss_scale = 1 / ctx.world_size if peers else 1.0
    splits = {
        name: DeviceSplit(split, dataset.mean, dataset.std, ctx.device)
        for name, split in (("train", dataset.train), ("val", dataset.val), ("test", dataset.test))
        if split is not None
    }
    steps_per_epoch = len(splits["train"]) // shard.world_size // train_cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"train.batch_size={train_cfg.batch_size} exceeds the {len(splits['train'])} training images")
    stepper = wrap(method) if wrap is not None and not peers else method
    optimizer = build_optimizer(method.trainable(), train_cfg, shard.world_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(train_cfg, steps_per_epoch))
    precision, scaler = autocast(ctx, train_cfg.amp)
    result = FitResult(state_dict={})
    augment = cfg.data.augment
    first_epoch = 0
    restored = checkpointer.restore() if checkpointer is not None else None
    if restored is not None:
        missing, _ = method.load_state_dict(restored["method"], strict=False)
        assert all(name.startswith("guides.") for name in missing), missing
        optimizer.load_state_dict(restored["optimizer"])
        scheduler.load_state_dict(restored["scheduler"])
        scaler.load_state_dict(restored["scaler"])
        torch.set_rng_state(restored["rng"].cpu())
        if ctx.device.type == "cuda" and "cuda_rng" in restored:
            torch.cuda.set_rng_state(restored["cuda_rng"].cpu(), ctx.device)
        result.history = restored["history"]
        first_epoch = restored["epoch"]
        log.info("%s: resumed after epoch %d", plan.role, first_epoch)
        for epoch, metrics in enumerate(result.history, start=1):  # a logger that holds them already skips them
            logger.log_metrics(metrics, step=epoch)
    for epoch in range(first_epoch, epochs):
        stepper.train()
        sums: dict[str, torch.Tensor] = {}
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        for index, batch in enumerate(
            train_batches(
                splits["train"],
                train_cfg.batch_size,
                epoch,
                train_cfg.seed,
                augment.padding,
                augment.flip,
                shard.rank,
                shard.world_size,
            )
        ):
            step = StepInfo(
                epoch, epoch * steps_per_epoch + index, steps_per_epoch, epochs * steps_per_epoch, batch.views
            )
            with precision:
                terms = stepper(batch.images.contiguous(memory_format=layout), batch.labels, step)
            loss = sum(terms.values())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss * loss_scale).backward()
            if peers:
                ensemble.sync_shared_gradients()  # type: ignore[union-attr]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            for name, value in terms.items():
                sums[name] = sums.get(name, 0) + value.detach().float()
        means = {f"loss/{name}": total / steps_per_epoch for name, total in sums.items()}
        epoch_loss = torch.stack(list(means.values())).sum()
        values = {name: value.item() for name, value in {**means, "loss/total": epoch_loss}.items()}
        if method.guide_cache is not None:
            method.guide_cache.flush()
        elapsed = time.perf_counter() - started
        if not math.isfinite(values["loss/total"]):
            raise TrainingDiverged(
                f"{plan.role}: the loss became {values['loss/total']} in epoch {epoch + 1}; lower train.lr"
            )
        method.eval()
        val = evaluate(method.deployable(), splits["val"], train_cfg.eval_batch_size, shard, method.eval_terms)
        metrics = {
            **values,
            **{f"val/{name}": value for name, value in val.items()},
            "lr": lr,
            "images_per_s": steps_per_epoch * train_cfg.batch_size * shard.world_size / elapsed,
            **guide_metrics(method),
        }
        result.history.append(metrics)
        logger.log_metrics(metrics, step=epoch + 1)
        if checkpointer is not None:
            state = {
                "method": {k: v for k, v in method.state_dict().items() if not k.startswith("guides.")},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": torch.get_rng_state(),
                **({"cuda_rng": torch.cuda.get_rng_state(ctx.device)} if ctx.device.type == "cuda" else {}),
                "history": result.history,
                "epoch": epoch + 1,
            }
            checkpointer.save(epoch + 1, state, metrics)
        if ctx.is_chief:
            log.info(
                "%-8s epoch %3d/%d  loss %.4f  val_acc %.4f  %6.0f img/s  lr %.4g",
                plan.role,
                epoch + 1,
                epochs,
                values["loss/total"],
                val["acc"],
                metrics["images_per_s"],
                lr,
            )
    result.final = {name: value for name, value in result.history[-1].items() if name.startswith("val/")}
    if "test" in splits:
        test = evaluate(method.deployable(), splits["test"], train_cfg.eval_batch_size, shard, method.eval_terms)
        result.final.update({f"test/{name}": value for name, value in test.items()})
    deployable = method.deployable().state_dict()
    result.state_dict = {name: tensor.detach().cpu() for name, tensor in deployable.items()}
    return result
