"""Branch parallelism: m workers × 1 branch compute what 1 process × m branches computes.

Two real processes in a gloo process group (torch.multiprocessing), each holding one branch, against
the single-process method on the same batch and initial weights: same loss terms, same gradients for
every parameter a worker trains, same evaluation statistics.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdray.data import Batch
from kdray.distributed import WorkerContext
from kdray.methods import METHODS, StepInfo
from kdray.methods.base import Parallel
from kdray.methods.ensemble import EnsembleMethod
from kdray.models import ModelInfo, build_model

DIGITS = ModelInfo(num_classes=10, in_channels=1, image_size=8)
STEP = StepInfo(epoch=0, step=30, steps_per_epoch=10, total_steps=100)  # past the start of the KD ramp-up
CPU = torch.device("cpu")
CASES = {
    "online_branch": {"name": "online_branch", "branches": 2, "cd_weight": 1e-3},
    "online_branch_mean": {"name": "online_branch", "branches": 2, "ffm": False},
    "dml": {"name": "dml", "peers": 2, "temperature": 2.0},
}


def build(case: str) -> EnsembleMethod:
    """The same method, weights and all, in every process (seeded initialisation)."""
    params = METHODS[CASES[case]["name"]].Params(**CASES[case])
    torch.manual_seed(0)
    return METHODS[params.name](build_model("resnet8", DIGITS), [], params)


def batch() -> Batch:
    generator = torch.Generator().manual_seed(1)
    images, labels = torch.randn(16, 1, 8, 8, generator=generator), torch.randint(0, 10, (16,), generator=generator)
    return Batch(images, labels, torch.arange(16))


def step(method: EnsembleMethod, run: Parallel) -> dict[str, object]:
    """One training step as the engine takes it (``run`` from the method's ``parallel`` hook): the terms and
    the gradients of what this process trains, by parameter name."""
    images, labels = batch().images, batch().labels
    run.stepper.train()
    terms = run.stepper(batch(), STEP)
    (sum(terms.values()) * run.loss_scale).backward()
    run.after_backward()
    trained = {id(p) for p in method.trainable()}
    grads = {name: p.grad.clone() for name, p in method.named_parameters() if id(p) in trained}
    with torch.no_grad():
        evaluation = method.eval().eval_terms(images, labels)
    return {
        "terms": {k: v.item() for k, v in terms.items()},
        "grads": grads,
        "eval": {k: v.sum().item() for k, v in evaluation.items()},
    }


def worker(rank: int, world_size: int, case: str, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world_size)
    try:
        method = build(case)
        run = method.parallel(WorkerContext(rank, world_size, CPU), "branches", wrap=None)
        assert run.shard.world_size == 1 and run.loss_scale == 1 / world_size  # every worker reads every batch
        torch.save(step(method, run), f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
@pytest.mark.parametrize("case", sorted(CASES))
def test_two_workers_with_one_branch_each_match_one_process_with_two_branches(case: str, tmp_path: Path) -> None:
    method = build(case)
    alone = step(method, method.parallel(WorkerContext(0, 1, CPU), "branches", wrap=None))
    mp.spawn(worker, args=(2, case, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    covered: set[str] = set()
    for rank, result in enumerate(ranks):
        assert result["terms"].keys() == alone["terms"].keys()
        for name, value in result["terms"].items():
            assert value == pytest.approx(alone["terms"][name], rel=1e-5, abs=1e-7), (rank, name)
        assert result["eval"] == pytest.approx(alone["eval"], abs=1e-6)
        for name, grad in result["grads"].items():
            assert torch.allclose(grad, alone["grads"][name], rtol=1e-4, atol=1e-6), (rank, name)
        covered |= set(result["grads"])
    # between them the two workers train every parameter the single process trains, and nothing else
    assert covered == set(alone["grads"])
    # each branch is trained by exactly one worker: the grads of branch 1 are absent from rank 0
    assert not any(name.startswith("branches.1.") for name in ranks[0]["grads"])


def test_branch_parallelism_refuses_a_worker_count_that_is_not_the_branch_count() -> None:
    with pytest.raises(ValueError, match="one worker per branch: 2 branches, 3 workers"):
        build("dml").split_across(0, 3)
