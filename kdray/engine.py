"""The epoch loop: one built stage (``kdray.build``) from its first epoch to its stored model.

Everything about where the loop runs comes in with the ``Stage`` (worker context, how the method
spreads over workers) and everything about where results go leaves through an ``EpochSink``
(``kdray.sinks``): the same loop runs in-process, in a Tune trial and on every Ray Train worker.
Per-step work stays on the device: loss terms are accumulated as tensors and read back once per
epoch (a ``.item()`` per step would stall the GPU every step).
"""

from __future__ import annotations

import logging
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from kdray.build import Stage, in_layout
from kdray.data import BatchSource, eval_batches, train_batches
from kdray.data.augment import ResizedCrops
from kdray.distributed import WorkerContext, all_reduce_sum
from kdray.guides import guide_metrics
from kdray.methods import StepInfo
from kdray.models import StagedNet
from kdray.schema import AugmentConfig
from kdray.stages import StagePlan

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class FitResult:
    state_dict: dict[str, torch.Tensor]
    history: list[dict[str, float]] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)


class EpochSink(Protocol):
    """Where a stage's epochs go (``kdray.sinks``): metrics and training state at the end of each epoch,
    the finished model at the end of the stage, and the state to continue from after a failure."""

    def restore(self) -> dict[str, Any] | None: ...

    def end_epoch(self, epoch: int, metrics: dict[str, float], state: Callable[[], dict[str, Any]]) -> None: ...

    def end_stage(self, result: FitResult) -> None: ...


def fit(stage: Stage, sink: EpochSink) -> FitResult:
    """Train ``stage`` to its last epoch: validate every epoch, test and store at the end.

    The finished model reaches ``sink.end_stage`` before the last epoch's ``end_epoch``, so whoever
    acts on that report (a search scheduler stopping the trial) cannot come between training and the
    stored model. A restored state continues with the epoch after it.
    """
    plan = stage.plan
    epochs = plan.train.epochs
    history = resume(stage, sink.restore())
    result, begun, first = None, time.perf_counter(), len(history)
    for epoch in range(first, epochs):
        started = time.perf_counter()
        lr = stage.optimizer.param_groups[0]["lr"]
        losses = train_epoch(stage, epoch)
        elapsed = time.perf_counter() - started
        if not math.isfinite(losses["loss/total"]):
            raise TrainingDiverged(
                f"{plan.role}: the loss became {losses['loss/total']} in epoch {epoch + 1}; lower train.lr"
            )
        val = evaluate_split(stage, "val")
        if plan.train.test_each_epoch and "test" in stage.splits:
            val.update(evaluate_split(stage, "test"))
        images = stage.steps_per_epoch * plan.train.batch_size * stage.parallel.shard.world_size
        metrics = {
            **losses, **val, "lr": lr, "images_per_s": images / elapsed, "epoch_s": elapsed, **memory_use(),
            **guide_metrics(stage.method.guides),
        }  # fmt: skip
        history.append(metrics)
        if epoch + 1 == epochs:
            result = finish(stage, history)
            sink.end_stage(result)
        sink.end_epoch(epoch + 1, metrics, lambda: training_state(stage, history))
        if stage.ctx.is_chief:
            log_epoch(
                plan, epoch + 1, metrics, (time.perf_counter() - begun) / (epoch + 1 - first) * (epochs - epoch - 1)
            )
    if result is None:  # restored from a state saved after the last epoch
        result = finish(stage, history)
        sink.end_stage(result)
    return result


def memory_use() -> dict[str, float]:
    """This process's own memory now (``private_mb``: pages no other process shares) and its peak resident
    memory so far (``peak_rss_mb``), in MiB.

    What a worker's data costs shows in ``private_mb``: the whole decoded dataset when in memory, a few
    batches when streamed. Resident memory also counts the pages of Ray's object store a streaming worker
    has read, which belong to the node's store (bounded by its own size) and are shared, not the worker's.
    """
    private = 0.0
    rollup = Path("/proc/self/smaps_rollup")
    if rollup.exists():  # Linux
        for line in rollup.read_text().splitlines():
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                private += int(line.split()[1]) / 1024
    return {"private_mb": private, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def log_epoch(plan: StagePlan, epoch: int, metrics: dict[str, float], left_s: float) -> None:
    """One line per epoch: which stage, how far, how well, how fast, and the time left at this pace."""
    minutes, seconds = divmod(round(left_s), 60)
    log.info(
        "%-8s %-12s epoch %3d/%d  loss %.4f  val_acc %.4f  %6.0f img/s  lr %.4g  eta %d:%02d",
        plan.role, plan.model.name, epoch, plan.train.epochs, metrics["loss/total"], metrics["val/acc"],
        metrics["images_per_s"], metrics["lr"], minutes, seconds,
    )  # fmt: skip


def train_epoch(stage: Stage, epoch: int) -> dict[str, float]:
    """One pass over this worker's shard; the mean of each loss term (``loss/<term>``) and their sum."""
    train, run, augment = stage.plan.train, stage.parallel, stage.cfg.data.augment
    steps = stage.steps_per_epoch
    run.stepper.train()
    sums: dict[str, torch.Tensor] = {}
    batches = train_batches(
        stage.splits["train"], train.batch_size, epoch, train.seed, augment.padding, augment.flip,
        run.shard.rank, run.shard.world_size, resized_crops(augment, train.seed, epoch),
    )  # fmt: skip
    for index, batch in enumerate(batches):
        at = epoch * steps + index
        step = StepInfo(epoch, at, steps, train.epochs * steps, np.random.default_rng([train.seed, run.shard.rank, at]))
        with stage.precision:
            terms = run.stepper(replace(batch, images=in_layout(batch.images, stage.layout)), step)
        loss = sum(terms.values())
        stage.optimizer.zero_grad(set_to_none=True)
        stage.scaler.scale(loss * run.loss_scale).backward()
        run.after_backward()
        stage.scaler.step(stage.optimizer)
        stage.scaler.update()
        stage.scheduler.step()
        for name, value in terms.items():
            sums[name] = sums.get(name, 0) + value.detach().float()
    means = {f"loss/{name}": total / steps for name, total in sums.items()}
    means["loss/total"] = torch.stack(list(means.values())).sum()
    return {name: value.item() for name, value in means.items()}


def resized_crops(augment: AugmentConfig, seed: int, epoch: int) -> ResizedCrops | None:
    """This epoch's random resized crops (None for crop_flip): new each epoch, or the epoch's within the cycle."""
    if augment.kind != "random_resized_crop":
        return None
    view = epoch % augment.crop_cycle if augment.crop_cycle else epoch
    return ResizedCrops(seed, view, augment.scale, augment.ratio)


def evaluate_split(stage: Stage, split: str) -> dict[str, float]:
    """``<split>/<statistic>`` of the deployable model (and the method's own statistics) over the whole split."""
    method = stage.method
    method.eval()
    values = evaluate(
        method.deployable(), stage.splits[split], stage.plan.train.eval_batch_size, stage.parallel.shard,
        method.eval_terms,
    )  # fmt: skip
    return {f"{split}/{name}": value for name, value in values.items()}


@torch.no_grad()
def evaluate(
    model: StagedNet,
    split: BatchSource,
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


def finish(stage: Stage, history: list[dict[str, float]]) -> FitResult:
    """The finished stage: last validation and test metrics, the best-on-validation epoch's (``best_epoch``),
    and the deployable weights on the CPU."""
    final = {name: value for name, value in history[-1].items() if name.startswith(("val/", "test/"))}
    if "test" in stage.splits and "test/acc" not in final:
        final.update(evaluate_split(stage, "test"))
    final.update(best_epoch(history))
    weights = stage.method.deployable().state_dict()
    return FitResult({name: tensor.detach().cpu() for name, tensor in weights.items()}, history, final)


def best_epoch(history: list[dict[str, float]]) -> dict[str, float]:
    """``best_epoch`` (1-based, the first of equals) by validation accuracy, and that epoch's ``val/*`` and
    ``test/*`` (the latter only when the test split was evaluated every epoch) under ``best_epoch/``.

    The stored model is the last epoch's; these say what stopping at the best validation epoch would have
    given, chosen without looking at the test split."""
    best = max(range(len(history)), key=lambda epoch: (history[epoch]["val/acc"], -epoch))
    chosen = {f"best_epoch/{k}": value for k, value in history[best].items() if k.startswith(("val/", "test/"))}
    return {"best_epoch": float(best + 1), **chosen}


def training_state(stage: Stage, history: list[dict[str, float]]) -> dict[str, Any]:
    """What a restart needs to continue exactly: trainable weights, optimiser, schedule, scaler, RNG, history."""
    method = {k: v for k, v in stage.method.state_dict().items() if not k.startswith("guides.")}
    state = {
        "method": method,
        "optimizer": stage.optimizer.state_dict(),
        "scheduler": stage.scheduler.state_dict(),
        "scaler": stage.scaler.state_dict(),
        "rng": torch.get_rng_state(),
        "history": history,
        "epoch": len(history),
    }
    if stage.ctx.device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(stage.ctx.device)
    return state


def resume(stage: Stage, state: dict[str, Any] | None) -> list[dict[str, float]]:
    """Load a saved training state into ``stage``; the metric history so far (empty for a fresh start)."""
    if state is None:
        return []
    missing, _ = stage.method.load_state_dict(state["method"], strict=False)
    assert all(name.startswith("guides.") for name in missing), missing
    stage.optimizer.load_state_dict(state["optimizer"])
    stage.scheduler.load_state_dict(state["scheduler"])
    stage.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"].cpu())
    if stage.ctx.device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), stage.ctx.device)
    log.info("%s: resumed after epoch %d", stage.plan.role, state["epoch"])
    return list(state["history"])
