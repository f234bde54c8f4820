"""Online ensembles: m branches (or peers) that teach each other, in one process or one per worker.

Two methods have this shape: online multi-branch KD (branches on a shared trunk, Li et al. 2020)
and deep mutual learning (independent peers, Zhang et al. 2018). Each computes its loss from the
outputs of all m branches.

In one process every branch runs here. In peer-parallel mode (``scaling.parallelism: branches``)
worker r owns branch r only, every worker sees the same batch, and the branch outputs are exchanged
with ``torch.distributed.nn.functional.all_gather``, whose backward hands each worker the gradient of
its own slot summed over all workers. Every worker therefore computes the same full loss L from the
gathered outputs and back-propagates L/m:

- branch r's parameters receive exactly ∂L/∂θ_r (m workers × 1/m);
- a replicated module (the shared trunk, the fusion module) receives, on each worker, the part of
  its gradient that flows through the local branch (trunk) or 1/m of it (fusion); ``sync_shared_gradients``
  sums those over workers, which gives exactly the single-process gradient.

So m branches train on m GPUs or nodes with the same losses and updates as one process with m branches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from kdray.distributed import WorkerContext
from kdray.methods.base import Method, MethodParams, Parallel, Planner, shard_of_one
from kdray.models import StagedNet


class EnsembleMethod(Method):
    """Base of methods whose m branches learn from each other (no pretrained guide).

    Subclasses put their branches in ``self.branches`` (keys "0".."m-1"; branch 0 is the deployable
    student) and say which modules every worker keeps (``shared_modules``).
    """

    @classmethod
    def plan_guides(cls, params: MethodParams, planner: Planner) -> list[str]:
        """No pretrained guide: the branches teach each other."""
        return []

    def __init__(self, student: StagedNet, guides: Sequence[nn.Module], params: MethodParams) -> None:
        super().__init__(student, guides, params)
        self.branches = nn.ModuleDict()
        self.owned: list[int] = []
        self.world_size = 1

    @classmethod
    def branch_count(cls, params: MethodParams) -> int:
        """m: the number of branches (peer-parallel mode needs this many workers)."""
        raise NotImplementedError

    def parallel(self, ctx: WorkerContext, parallelism: str, wrap: Callable[[nn.Module], nn.Module] | None) -> Parallel:
        """``parallelism: branches``: this worker keeps branch ``rank``, reads every batch, back-propagates
        L/m and sums the shared modules' gradients over workers (see the module docstring)."""
        if parallelism != "branches" or ctx.world_size == 1:
            return super().parallel(ctx, parallelism, wrap)
        self.split_across(ctx.rank, ctx.world_size)
        return Parallel(self, shard_of_one(ctx), 1 / ctx.world_size, self.sync_shared_gradients)

    def shared_modules(self) -> list[nn.Module]:
        """Modules every worker holds and trains together (their gradients are summed over workers)."""
        return []

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        """The computation shared by all branches (none by default: every branch sees the images)."""
        return images

    def run_branch(self, index: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Branch ``index`` on the trunk's output: its logits and the feature map others need (or None)."""
        raise NotImplementedError

    def split_across(self, rank: int, world_size: int) -> None:
        """Keep branch ``rank`` only: this worker's share of a peer-parallel run of ``world_size`` workers."""
        count = len(self.branches)
        if world_size != count:
            raise ValueError(f"branch parallelism needs one worker per branch: {count} branches, {world_size} workers")
        for index in range(count):
            if index != rank:
                del self.branches[str(index)]
        self.owned = [rank]
        self.world_size = world_size

    def collect(self, local: list[torch.Tensor]) -> list[torch.Tensor]:
        """One tensor per branch, all m of them: the local list in one process, gathered across workers
        (with gradient) in peer-parallel mode."""
        if self.world_size == 1:
            return local
        (mine,) = local
        return list(dist_fn.all_gather(mine.contiguous()))

    def branch_outputs(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Logits and feature maps of all m branches (branch order), wherever they run."""
        hidden = self.trunk(images)
        outputs = [self.run_branch(index, hidden) for index in self.owned]
        logits = self.collect([z for z, _ in outputs])
        if outputs[0][1] is None:
            return logits, [None] * len(logits)
        return logits, self.collect([f for _, f in outputs])  # type: ignore[misc]

    def trainable(self) -> list[nn.Parameter]:
        """The shared modules and the branches this worker owns (all of them in one process)."""
        modules = [*self.shared_modules(), *(self.branches[str(i)] for i in self.owned)]
        unique = {id(p): p for module in modules for p in module.parameters() if p.requires_grad}
        return list(unique.values())

    def sync_shared_gradients(self) -> None:
        """Peer-parallel mode: sum the shared modules' gradients over workers (see the module docstring)."""
        if self.world_size == 1:
            return
        params = {id(p): p for m in self.shared_modules() for p in m.parameters() if p.grad is not None}
        grads = [p.grad for p in params.values()]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])  # type: ignore[union-attr]
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))  # type: ignore[union-attr]
            offset += grad.numel()  # type: ignore[union-attr]

    def eval_terms(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-branch and ensemble accuracy, and the branches' mean pairwise disagreement."""
        logits, _ = self.branch_outputs(images)
        return ensemble_statistics(logits, labels)


def ensemble_statistics(logits: Sequence[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample statistics of m branches: each one's correctness, the averaged ensemble's, and how
    often two branches disagree (the diversity online ensembles try to keep)."""
    predictions = [z.argmax(1) for z in logits]
    terms = {f"acc_branch{b}": (p == labels).float() for b, p in enumerate(predictions)}
    terms["acc_ensemble"] = (torch.stack(list(logits)).mean(0).argmax(1) == labels).float()
    pairs = [(a, b) for i, a in enumerate(predictions) for b in predictions[i + 1 :]]
    terms["disagreement"] = sum((a != b).float() for a, b in pairs) / len(pairs)
    return terms
