"""The build step of a stage: from its plan to everything the epoch loop needs.

``build_stage`` makes the student, wraps the frozen guides (with the guide-output cache when it is
on), builds the method, lets the method say how it trains on this worker (``Method.parallel``), puts
the data on the device and builds optimiser, LR schedule and mixed precision. ``engine.fit`` then only
loops. A Ray Train worker and an in-process run call the same function with their own context.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from kdray.data import BatchSource, Dataset, on_device
from kdray.data.augment import view_count
from kdray.distributed import WorkerContext
from kdray.guide_cache import GuideCache
from kdray.guides import Guide
from kdray.methods import METHODS, Method
from kdray.methods.base import Parallel
from kdray.models import ModelInfo, build_model
from kdray.schema import ConfigError, ExperimentConfig, TrainConfig
from kdray.stages import StagePlan

log = logging.getLogger(__name__)


@dataclass
class Stage:
    """A stage ready to train: its plan, method, how this worker runs it, optimiser state and data."""

    plan: StagePlan
    cfg: ExperimentConfig
    ctx: WorkerContext
    method: Method
    parallel: Parallel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    precision: contextlib.AbstractContextManager
    layout: torch.memory_format
    splits: dict[str, BatchSource]
    steps_per_epoch: int


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


def in_layout(images: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
    """``images`` with exactly the dense strides of ``layout``, copied only if they have others.

    ``Tensor.contiguous`` keeps strides that are already contiguous in the layout, and a one-channel batch
    gathered from the dataset (digits, MNIST) is contiguous in both NCHW and NHWC while carrying NHWC's
    strides: its convolutions then run channels_last, the weight gradients of 1x1 and one-input-channel
    convolutions come back with strides other than their parameters', and DDP copies them into its buckets
    every step ("Grad strides do not match bucket view strides")."""
    if images.stride() == torch.empty(images.shape, device="meta", memory_format=layout).stride():
        return images
    return images.clone(memory_format=layout)


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
        "normalise": [list(dataset.mean), list(dataset.std), "scale-shift"],  # augment.normalize's form
        "compute": [device, str(autocast_dtype(ctx, train.amp) or torch.float32), str(memory_format(ctx, train))],
    }
    views = view_count(augment.padding, augment.flip)
    if augment.kind == "random_resized_crop":  # a view is (epoch of the cycle, flip); its crop comes from the seed
        assert augment.crop_cycle is not None
        data_identity["crop_seed"] = train.seed
        views *= augment.crop_cycle
    shape = (len(dataset.train), views, dataset.num_classes)
    return GuideCache(cfg.guide_cache, cfg.guide_cache_folder, data_identity, shape, ctx.device)


def make_guides(
    cfg: ExperimentConfig, dataset: Dataset, ctx: WorkerContext, train: TrainConfig, models: Sequence[nn.Module]
) -> list[Guide]:
    """The frozen guides, each in front of its cached outputs when ``guide_cache.enabled`` and the views repeat:
    random resized crops drawn anew every epoch (no ``data.augment.crop_cycle``) never do, so those run uncached."""
    if not (models and cfg.guide_cache.enabled):
        return [Guide(model) for model in models]
    augment = cfg.data.augment
    if augment.kind == "random_resized_crop" and augment.crop_cycle is None:
        log.info("guide cache bypassed: random_resized_crop draws new crops every epoch (data.augment.crop_cycle)")
        return [Guide(model) for model in models]
    cache = guide_cache(cfg, dataset, ctx, train)
    return [Guide(model, cache.lookup(model)) for model in models]


def check_batch_fits(batch_size: int, images: int, shards: int) -> None:
    """One step per epoch at least: each of ``shards`` workers needs a whole batch of its share of the images."""
    if images // shards >= batch_size:
        return
    if shards == 1:
        raise ConfigError(
            f"train.batch_size={batch_size} is larger than the {images} training images; "
            f"set train.batch_size to at most {images}"
        )
    raise ConfigError(
        f"train.batch_size={batch_size} per worker needs {batch_size * shards} training images for "
        f"scaling.num_workers={shards} workers, and there are {images}; set train.batch_size to at most "
        f"{images // shards}, or use fewer workers"
    )


def build_stage(
    cfg: ExperimentConfig,
    plan: StagePlan,
    dataset: Dataset,
    guide_models: Sequence[nn.Module],
    ctx: WorkerContext,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
) -> Stage:
    """Everything ``engine.fit`` needs to train ``plan`` on this worker.

    ``wrap`` prepares the method for data-parallel training (Ray Train's ``prepare_model`` wraps it in
    DDP, so the student and any extra trainable modules are synchronised; frozen guides have no
    gradients and DDP leaves them alone); the method may choose another arrangement (branches).
    """
    train = plan.train
    torch.manual_seed(train.seed)
    info = replace(model_info(dataset), onthefly=plan.model.onthefly, batchnorm=plan.model.batchnorm)
    student = build_model(plan.model.name, info)
    layout = memory_format(ctx, train)
    guides = make_guides(cfg, dataset, ctx, train, guide_models)
    method = METHODS[plan.method.name](student, guides, plan.method)
    method.connect(info, dataset.train.labels)  # connectors sized from the features, seeded like the student
    method = method.to(ctx.device, memory_format=layout)
    if train.compile:
        for model in (student, *(guide.model for guide in guides)):
            model.compile()
    parallel = method.parallel(ctx, cfg.scaling.parallelism, wrap)
    splits = {
        name: on_device(split, dataset.mean, dataset.std, ctx.device, cfg.data)
        for name, split in (("train", dataset.train), ("val", dataset.val), ("test", dataset.test))
        if split is not None
    }
    check_batch_fits(train.batch_size, len(splits["train"]), parallel.shard.world_size)
    steps_per_epoch = len(splits["train"]) // parallel.shard.world_size // train.batch_size
    optimizer = build_optimizer(method.trainable(), train, parallel.shard.world_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(train, steps_per_epoch))
    precision, scaler = autocast(ctx, train.amp)
    return Stage(
        plan, cfg, ctx, method, parallel, optimizer, scheduler, scaler, precision, layout, splits, steps_per_epoch
    )
