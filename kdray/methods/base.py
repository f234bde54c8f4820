"""The method interface: a method turns a batch into named, already weighted loss terms.

Following mdistiller's ``Distiller``: the engine only sums the terms and logs each one as
``loss/<name>``, so a new method needs no engine change. A method owns its student and its frozen
guides (teacher, assistants); ``trainable()`` says what the optimiser updates.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from kdray.data import Views
from kdray.models import StagedNet
from kdray.registry import Registry

if TYPE_CHECKING:
    from kdray.guide_cache import GuideCache


@dataclass(frozen=True)
class StepInfo:
    """Where training is: lets schedules inside a method (ramp-ups, pacing) avoid global state."""

    epoch: int
    step: int  # global step, counted from 0
    steps_per_epoch: int
    total_steps: int
    views: Views | None = None  # which (training image, crop, flip) each row of the batch is

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1)."""
        return self.step / max(1, self.total_steps)


class MethodParams(BaseModel):
    """Base of every method's hyperparameters; ``name`` selects the method."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str


Guidance = Literal["alone", "teacher", "chain", "pacemaker"]


class Method(nn.Module):
    """Base class: ``forward(images, labels, step)`` returns ``{term: weighted scalar loss}``.

    ``guidance`` tells the stage planner which models a method learns from: none (``alone``), the
    teacher, an assistant chain ending at the teacher, or a pacemaker and the teacher.
    """

    Params: ClassVar[type[MethodParams]]
    kind: ClassVar[Guidance] = "teacher"
    summary: ClassVar[str] = ""

    @classmethod
    def guidance(cls, params: MethodParams) -> Guidance:
        """Which guides this method needs with these hyperparameters (some methods can run alone)."""
        return cls.kind

    def __init__(self, student: StagedNet, guides: Sequence[StagedNet], params: MethodParams) -> None:
        super().__init__()
        if self.guidance(params) != "alone" and not guides:
            raise ValueError(f"method '{params.name}' needs a teacher")
        self.student = student
        self.guides = nn.ModuleList(guides)
        self.params = params
        self.guide_cache: GuideCache | None = None  # set by the engine when guide_cache.enabled
        self.guide_images = 0  # images the guides ran on (the engine logs and resets it every epoch)
        for guide in self.guides:
            guide.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> Method:
        """Switch the student only: guides stay in eval mode (frozen BatchNorm statistics)."""
        super().train(mode)
        self.guides.eval()
        return self

    def trainable(self) -> list[nn.Parameter]:
        """Parameters the optimiser updates (the student; methods with extra modules extend this)."""
        return [p for p in self.student.parameters() if p.requires_grad]

    def deployable(self) -> StagedNet:
        """The model that is evaluated, stored and deployed (the student; one branch for multi-branch)."""
        return self.student

    def eval_terms(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra per-sample validation statistics (e.g. each branch's correctness), averaged by the engine."""
        return {}

    def guide_logits(self, index: int, images: torch.Tensor, views: Views | None = None) -> torch.Tensor:
        """Logits of frozen guide ``index`` for ``images``, computed without autograd.

        Methods pass ``views`` (``step.views``) only when ``images`` are the batch's own images: then the
        guide-output cache may answer. Mixed or otherwise transformed inputs never pass them, so they
        always run the guide.
        """
        if views is not None and self.guide_cache is not None:
            compute = functools.partial(self._run_guide, index)
            return self.guide_cache.logits(index, self.guides[index], images, views, compute)
        return self._run_guide(index, images)

    def _run_guide(self, index: int, images: torch.Tensor) -> torch.Tensor:
        self.guide_images += len(images)
        with torch.inference_mode():
            return self.guides[index](images)

    def forward(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo) -> dict[str, torch.Tensor]:
        raise NotImplementedError


METHODS: Registry[type[Method]] = Registry("method")
