"""CRD under real DDP: two processes in a gloo process group, each stepping on its own half of the batch, end
with the same memory bank and the same Z, and each bank holds both workers' rows (gathered at every update,
not broadcast from rank 0, which would drop rank 1's rows)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from kdray.data import Batch
from kdray.distributed import WorkerContext
from kdray.methods import METHODS, StepInfo
from kdray.models import ModelInfo, build_model

DIGITS = ModelInfo(num_classes=10, in_channels=1, image_size=8)
LABELS = torch.arange(40) % 10
HALVES = [torch.tensor([1, 4, 9, 12, 30, 33]), torch.tensor([2, 7, 15, 21, 26, 38])]


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    teacher = build_model("resnet8", DIGITS).eval()
    method = METHODS["crd"](build_model("plane2", DIGITS), [teacher], METHODS["crd"].Params(nce_k=20))
    method.connect(DIGITS, LABELS)
    return method


def worker(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        method = build()
        initial = method.memory_student.clone()
        run = method.parallel(WorkerContext(rank, 2, torch.device("cpu")), "data", DistributedDataParallel)
        optimizer = torch.optim.SGD(method.trainable(), lr=0.1)
        for at in range(2):
            index = HALVES[rank] + at  # another sample set in the second step
            generator = torch.Generator().manual_seed(10 * at + rank)
            batch = Batch(torch.randn(6, 1, 8, 8, generator=generator), LABELS[index], index)
            step = StepInfo(0, at, 2, 2, np.random.default_rng([0, rank, at]))
            optimizer.zero_grad()
            sum(run.stepper(batch, step).values()).backward()
            optimizer.step()
        torch.save(
            {"initial": initial, "student": method.memory_student, "teacher": method.memory_teacher,
             "z": method.normalizers},
            f"{folder}/rank{rank}.pt",
        )  # fmt: skip
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_two_ddp_workers_keep_one_memory_bank(tmp_path: Path) -> None:
    mp.spawn(worker, args=(str(tmp_path),), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for name in ("student", "teacher", "z"):
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    assert (ranks[0]["z"] > 0).all()
    touched = torch.cat([HALVES[0], HALVES[1], HALVES[0] + 1, HALVES[1] + 1]).unique()
    changed = (ranks[0]["student"] != ranks[0]["initial"]).any(1)
    assert torch.equal(changed.nonzero().flatten(), touched)  # both workers' rows, and only those
