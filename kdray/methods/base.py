"""The method interface: a method turns a batch into named, already weighted loss terms.

Following mdistiller's ``Distiller``: the engine only sums the terms and logs each one as
``loss/<name>``, so a new method needs no engine change. A method owns its student and its frozen
guides (teacher, assistants); ``trainable()`` says what the optimiser updates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from kdray.models import StagedNet
from kdray.registry import Registry


@dataclass(frozen=True)
class StepInfo:
    """Where training is: lets schedules inside a method (ramp-ups, pacing) avoid global state."""

    epoch: int
    step: int  # global step, counted from 0
    steps_per_epoch: int
    total_steps: int

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1)."""
        return self.step / max(1, self.total_steps)


class MethodParams(BaseModel):
    """Base of every method's hyperparameters; ``name`` selects the method."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str


class Method(nn.Module):
    """Base class: ``forward(images, labels, step)`` returns ``{term: weighted scalar loss}``."""

    Params: ClassVar[type[MethodParams]]
    needs_teacher: ClassVar[bool] = True
    summary: ClassVar[str] = ""

    def __init__(self, student: StagedNet, guides: Sequence[StagedNet], params: MethodParams) -> None:
        super().__init__()
        if self.needs_teacher and not guides:
            raise ValueError(f"method '{params.name}' needs a teacher")
        self.student = student
        self.guides = nn.ModuleList(guides)
        self.params = params
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

    def guide_logits(self, index: int, images: torch.Tensor) -> torch.Tensor:
        """Logits of frozen guide ``index``, computed without building a graph."""
        with torch.no_grad():
            return self.guides[index](images)

    def forward(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo) -> dict[str, torch.Tensor]:
        raise NotImplementedError


METHODS: Registry[type[Method]] = Registry("method")
