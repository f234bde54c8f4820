"""The method interface: a method turns a batch into named, already weighted loss terms.

Following mdistiller's ``Distiller``: the engine only sums the terms and logs each one as
``loss/<name>``, so a new method needs no engine change. A method owns its student and its frozen
guides and says everything else about itself next to its loss: which guides it learns from and how
they are trained (``plan_guides``), what the optimiser updates (``trainable``), and how it spreads
over several workers (``parallel``). Adding a method is one file in ``kdray/methods/`` (the package imports
every module in it) or in a package of your own (an entry point); nothing outside it names the method.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from kdray.data import Batch
from kdray.distributed import WorkerContext
from kdray.guides import Guide, as_guides
from kdray.models import ModelInfo, StagedNet
from kdray.registry import Registry
from kdray.schema import ExperimentConfig, MethodParams, ModelConfig, TrainConfig


class Planner(Protocol):
    """What a method's ``plan_guides`` plans its guides with (``kdray.stages.StagePlanner`` is the one kdray
    passes): the experiment, read-only; its teacher; its assistant ladder; ``add`` for any further stage.
    Each call returns the planned stage's store key."""

    cfg: ExperimentConfig

    def teacher(self) -> str: ...

    def assistant_models(self) -> list[str]: ...

    def assistant(self, index: int, name: str, method: MethodParams, guides: list[str]) -> str: ...

    def add(
        self, role: str, model: ModelConfig, method: MethodParams, guides: list[str], train: TrainConfig | None = None
    ) -> str: ...


@dataclass(frozen=True)
class StepInfo:
    """Where training is, and this step's own random numbers.

    Schedules inside a method (ramp-ups, pacing) read the position instead of global state; random
    choices (mixing weights, partners, dropped guides, negatives) are drawn from ``rng``, seeded by
    the run's seed, the worker's rank and the step, so a resumed run draws exactly what an
    uninterrupted one would, and no method touches torch's global generator.
    """

    epoch: int
    step: int  # global step, counted from 0
    steps_per_epoch: int
    total_steps: int
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1)."""
        return self.step / max(1, self.total_steps)

    def permutation(self, count: int, device: torch.device) -> torch.Tensor:
        """A random permutation of ``range(count)`` on ``device``."""
        return torch.as_tensor(self.rng.permutation(count), device=device)


@dataclass(frozen=True)
class Parallel:
    """How one worker takes part in training a method.

    ``stepper`` is called on each batch (the method, or its DDP wrapper); ``shard`` says which part of
    the data this worker reads (its own shard, or the whole stream when every worker sees every
    batch); the loss is multiplied by ``loss_scale`` before backward, and ``after_backward`` runs
    before the optimiser step (to combine gradients DDP does not handle).
    """

    stepper: nn.Module
    shard: WorkerContext
    loss_scale: float = 1.0
    after_backward: Callable[[], None] = lambda: None


class Method(nn.Module):
    """Base class: ``forward(batch, step)`` returns ``{term: weighted scalar loss}``."""

    Params: ClassVar[type[MethodParams]]
    summary: ClassVar[str] = ""
    listed: ClassVar[int] = 100  # place in `kdray methods` and every list of methods (ties: as registered)
    uses_assistants: ClassVar[bool] = False  # reads the ``assistants`` section (teacher-assistant chains)
    student_stages: ClassVar[int] = 0  # named stages the student must have (0: logits are all it reads)
    guide_stages: ClassVar[int] = 0  # named stages every guide must have (feature methods read them)

    @classmethod
    def plan_guides(cls, params: MethodParams, planner: Planner) -> list[str]:
        """Plan the stages of this method's guides and return their store keys, in the order ``self.guides``
        will hold them. Each planned stage is trained (or reused) before the student. Default: one teacher."""
        return [planner.teacher()]

    @classmethod
    def student_params(cls, params: MethodParams, planner: Planner) -> MethodParams:
        """The method the student stage is trained by, in its plainest equivalent form: a chain without
        assistants is Hinton KD, so ``takd`` at depth 0 and ``kd`` plan the same stage (one store key, trained
        once). Default: ``params`` themselves."""
        return params

    @classmethod
    def branch_count(cls, params: MethodParams) -> int | None:
        """Branches that can each train on their own worker (``scaling.parallelism: branches``); None if the
        method has none."""
        return None

    def __init__(self, student: StagedNet, guides: Sequence[nn.Module], params: MethodParams) -> None:
        super().__init__()
        self.student = student
        self.guides = nn.ModuleList(as_guides(guides))
        self.params = params

    def connect(self, info: ModelInfo, train_labels: torch.Tensor) -> None:
        """Build the modules that depend on the shapes of the student's and the guides' features (a feature
        method's connectors, from one probe batch of ``info``'s image shape) or on the training set
        (``train_labels``, one per sample in the order of ``Batch.index``: CRD's memory bank of every sample);
        called once, before training, before a checkpoint is restored into them and before the method moves
        to its device. Default: none."""

    def trainable(self) -> list[nn.Parameter]:
        """Parameters the optimiser updates: the student and any module of the method's own (connectors,
        embedding heads), which train with the student, are checkpointed with it, and are not stored with
        the model (``deployable``). Frozen guides never are."""
        guides = {id(p) for p in self.guides.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in guides]

    def deployable(self) -> StagedNet:
        """The model that is evaluated, stored and deployed (the student; one branch for multi-branch)."""
        return self.student

    def eval_terms(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra per-sample validation statistics (e.g. each branch's correctness), averaged by the engine."""
        return {}

    def parallel(self, ctx: WorkerContext, parallelism: str, wrap: Callable[[nn.Module], nn.Module] | None) -> Parallel:
        """Data parallelism: each worker trains on its shard, the module wrapped (DDP) by ``wrap``.
        Methods with branches override this for ``parallelism == "branches"``."""
        return Parallel(wrap(self) if wrap is not None else self, ctx)

    def guide(self, index: int) -> Guide:
        """Guide ``index``, in the order ``plan_guides`` returned their keys."""
        if index >= len(self.guides):
            raise ValueError(
                f"method '{self.params.name}' needs a teacher (guide {index}) but was given {len(self.guides)} guides"
            )
        return self.guides[index]  # type: ignore[return-value]

    def forward(self, batch: Batch, step: StepInfo) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def shard_of_one(ctx: WorkerContext) -> WorkerContext:
    """A one-worker view of the data: every worker reads the whole stream (branch parallelism)."""
    return replace(ctx, rank=0, world_size=1)


METHODS: Registry[type[Method]] = Registry("method", order=lambda method: method.listed)
"""Distillation methods; importing ``kdray.methods`` registers every method of the package."""
