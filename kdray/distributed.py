"""Where a training loop runs: rank, world size and device, in one small object.

The engine reads everything about its process from a ``WorkerContext``; in-process runs use
``local_context``, Ray Train workers ``ray_train_context`` (from ``ray.train.get_context()``), so the
same loop runs unchanged in both places. Making a context is also where a training process takes
its one piece of process-wide setup, torch's CPU thread count (``scaling.threads``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from kdray.schema import ConfigError


@dataclass(frozen=True)
class WorkerContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_chief(self) -> bool:
        """Only the chief (rank 0) writes checkpoints, the model store and MLflow."""
        return self.rank == 0


def pick_device(use_gpu: bool | None) -> torch.device:
    """CUDA when asked for (or, with ``None``, when visible), else CPU."""
    if use_gpu or (use_gpu is None and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("scaling.use_gpu is true but no CUDA device is visible; set scaling.use_gpu=false")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def use_threads(threads: int | None) -> None:
    """torch's intra-op CPU threads for this process (None: torch's default, one per core)."""
    if threads:
        torch.set_num_threads(threads)


def local_context(use_gpu: bool | None, threads: int | None = None) -> WorkerContext:
    """This process as the only worker."""
    use_threads(threads)
    return WorkerContext(rank=0, world_size=1, device=pick_device(use_gpu))


def ray_train_context(threads: int | None = None) -> WorkerContext:
    """This Ray Train worker: its rank in the group and the device Ray gave it."""
    import ray.train
    import ray.train.torch

    use_threads(threads)
    context = ray.train.get_context()
    return WorkerContext(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device())


def all_reduce_sum(values: torch.Tensor, ctx: WorkerContext) -> torch.Tensor:
    """Sum ``values`` over all workers (identity in a single process)."""
    if ctx.world_size > 1 and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_cat(values: torch.Tensor, ctx: WorkerContext) -> torch.Tensor:
    """Every worker's ``values`` (each of the same shape), concatenated along the first dimension in rank order
    (``values`` itself in a single process)."""
    if ctx.world_size > 1 and dist.is_initialized():
        parts = [torch.empty_like(values) for _ in range(ctx.world_size)]
        dist.all_gather(parts, values.contiguous())
        return torch.cat(parts)
    return values
