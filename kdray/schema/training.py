"""How a stage trains (optimiser, schedule, seed) and where it runs (in process or on Ray Train workers)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kdray.schema.fields import (
    BATCH_MAX,
    EPOCHS_MAX,
    SEED_MAX,
    WORKERS_MAX,
    AbsolutePath,
    Section,
    default_storage_path,
)


class TrainConfig(Section):
    in_weights = frozenset({
        "epochs", "batch_size", "optimizer", "lr", "lr_scaling", "momentum", "nesterov", "weight_decay", "schedule",
        "step_size", "milestones", "gamma", "warmup_epochs", "seed", "amp",
    })  # fmt: skip
    not_in_weights = frozenset({"eval_batch_size", "channels_last", "compile", "test_each_epoch"})  # same math

    epochs: int = Field(10, ge=1, le=EPOCHS_MAX, description="Training epochs of the student (and teacher unless set).")
    batch_size: int = Field(128, ge=2, le=BATCH_MAX, description="Images per step on each worker.")
    eval_batch_size: int = Field(1024, ge=1, le=BATCH_MAX, description="Images per evaluation step.")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="SGD (momentum) or AdamW.")
    lr: float = Field(0.05, gt=0, description="Peak learning rate (per worker batch; see lr_scaling).")
    lr_scaling: Literal["none", "linear"] = Field(
        "none",
        description="linear: multiply lr by the number of workers (Goyal et al. 2017), as the global batch grows.",
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (AdamW: beta1).")
    nesterov: bool = Field(False, description="Nesterov momentum (SGD).")
    weight_decay: float = Field(5e-4, ge=0, description="Weight decay.")
    schedule: Literal["constant", "step", "multistep", "cosine"] = Field("cosine", description="LR schedule.")
    step_size: int = Field(30, ge=1, le=EPOCHS_MAX, description="Epochs between decays for schedule=step.")
    milestones: list[int] = Field(default_factory=list, description="Epochs of decay for schedule=multistep.")
    gamma: float = Field(0.1, gt=0, le=1, description="Decay factor of step/multistep.")
    warmup_epochs: int = Field(0, ge=0, le=EPOCHS_MAX, description="Linear warm-up epochs before the schedule.")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed of initialisation, batch order and augmentation.")
    amp: bool = Field(True, description="Mixed precision on GPU (bf16 where supported, else fp16); no-op on CPU.")
    channels_last: bool = Field(True, description="NHWC memory layout on GPU (faster convolutions); no-op on CPU.")
    compile: bool = Field(False, description="torch.compile the student and guides (slow first epoch, faster later).")
    test_each_epoch: bool = Field(
        False,
        description="Evaluate the test split after every epoch too (test/* per epoch), so a report can give the test "
        "accuracy at the best-on-validation epoch. Select on val/*, never on test/*.",
    )

    @model_validator(mode="after")
    def _schedule_fits(self) -> TrainConfig:
        if self.schedule == "multistep":
            if not self.milestones:
                raise ValueError("schedule=multistep needs train.milestones, e.g. [150, 180, 210]")
            if sorted(self.milestones) != self.milestones or self.milestones[-1] >= self.epochs:
                raise ValueError(f"train.milestones must increase and stay below train.epochs={self.epochs}")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"train.warmup_epochs must be below train.epochs={self.epochs}")
        return self


class ScalingConfig(Section):
    num_workers: int = Field(
        0, ge=0, le=WORKERS_MAX, description="0 = train in this process; N >= 1 = N Ray Train workers (DDP)."
    )
    use_gpu: bool | None = Field(None, description="null = use GPUs when the machine (or Ray cluster) has them.")
    threads: int | None = Field(
        None, ge=1, le=WORKERS_MAX, description="CPU threads for torch (null = torch's default)."
    )
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="Ray resources per worker, e.g. {CPU: 4, GPU: 1}."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="Ray placement of the workers: PACK fills a node first, SPREAD puts them on different nodes.",
    )
    parallelism: Literal["data", "branches"] = Field(
        "data",
        description="data: DDP, each worker trains on its shard; branches: online ensembles (online_branch, dml) "
        "with one branch per worker, all workers on the same batches (num_workers = number of branches).",
    )
    sync_batchnorm: bool = Field(
        False, description="Data parallelism on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)."
    )
    checkpoint_every: int = Field(1, ge=1, le=EPOCHS_MAX, description="Checkpoint the training state every K epochs.")
    keep_checkpoints: int = Field(
        2, ge=1, le=1000, description="Ray checkpoints kept per stage or trial (the newest; older ones are deleted)."
    )
    max_failures: int = Field(
        0,
        ge=0,
        le=1000,
        description="Ray runs: restart from the last checkpoint up to N times (bad input is never retried).",
    )
    storage_path: AbsolutePath = Field(
        default_factory=default_storage_path,
        validate_default=True,
        description="Ray Train/Tune run storage (checkpoints, search state; default: $KDRAY_STORAGE_PATH, else "
        ".kdray/ray); shared storage (s3://, NFS) on several nodes.",
    )

    @property
    def on_ray_train(self) -> bool:
        """Whether stages train on Ray Train workers (``num_workers >= 1``) rather than in the process running
        them: the one place the route is decided."""
        return self.num_workers >= 1

    @property
    def data_shards(self) -> int:
        """How many workers split each epoch's images: every worker under data parallelism, one under branch
        parallelism (every worker reads every batch)."""
        return max(1, self.num_workers) if self.parallelism == "data" else 1
