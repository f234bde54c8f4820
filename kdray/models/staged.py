"""The one model shape kdray uses: named stages followed by a classifier head.

Methods need more than logits: feature-map mixup continues a forward pass from a named stage, the
multi-branch method copies the last stage into branches, and feature-based losses read stage
outputs. Making every architecture an ordered list of named stages gives all of them one explicit
interface instead of forward hooks addressed by module-path strings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class StagedNet(nn.Module):
    """A classifier written as ``head(stage_n(...stage_1(x)))`` with every stage named.

    A model kdray cannot split (a user's module with its own ``forward``) is ``StagedNet([], module)``: no
    stages, so only methods that need nothing but logits take it. ``source_names`` maps the parameter
    names of the module a foreign model was built from to its own, so weights saved from that module load.
    """

    def __init__(
        self, stages: Sequence[tuple[str, nn.Module]], head: nn.Module, source_names: dict[str, str] | None = None
    ) -> None:
        super().__init__()
        self.stages = nn.ModuleDict(dict(stages))
        self.head = head
        self.source_names = source_names or {}

    @property
    def stage_names(self) -> list[str]:
        return list(self.stages.keys())

    @property
    def classifier(self) -> nn.Linear:
        """The last linear layer: the per-class weights (used by classifier-level losses)."""
        linears = [m for m in self.head.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("the model's head has no linear classifier layer")
        return linears[-1]

    def forward(
        self, x: torch.Tensor, features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits, and with ``features=True`` also every stage's output by name (same pass)."""
        outputs: dict[str, torch.Tensor] = {}
        for name, stage in self.stages.items():
            x = stage(x)
            if features:
                outputs[name] = x
        logits = self.head(x)
        return (logits, outputs) if features else logits

    def forward_to(self, stage: str, x: torch.Tensor) -> torch.Tensor:
        """Run the stages up to and including ``stage``; its output is what ``forward_from`` takes."""
        self._check_stage(stage)
        for name, module in self.stages.items():
            x = module(x)
            if name == stage:
                break
        return x

    def _check_stage(self, stage: str) -> None:
        if stage not in self.stages:
            raise KeyError(f"unknown stage '{stage}'; stages are {', '.join(self.stage_names)}")

    def forward_from(self, stage: str, hidden: torch.Tensor) -> torch.Tensor:
        """Continue a forward pass from the output of ``stage`` (which must be a stage name)."""
        self._check_stage(stage)
        names = self.stage_names
        for name in names[names.index(stage) + 1 :]:
            hidden = self.stages[name](hidden)
        return self.head(hidden)


class PooledLinearHead(nn.Module):
    """Global average pooling then one linear layer: the head of every residual family."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


def conv3x3(
    in_channels: int, out_channels: int, stride: int = 1, onthefly: bool = False, bias: bool = False
) -> nn.Conv2d:
    """The 3x3 convolution every family is built from (padding keeps the size at stride 1).

    ``onthefly`` makes it a 1x3 convolution, the "on-the-fly" 1xN filter of Pacemaker KD
    (Son et al., 2020): a third of the weights, same output size (padding 0 vertically, 1 horizontally).
    """
    if onthefly:
        return nn.Conv2d(in_channels, out_channels, kernel_size=(1, 3), stride=stride, padding=(0, 1), bias=bias)
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=bias)


def norm2d(channels: int, batchnorm: bool = True) -> nn.Module:
    """BatchNorm, or nothing: without BatchNorm, data-parallel training is exactly large-batch training
    (no per-worker batch statistics), which is what the multi-worker equivalence test relies on."""
    return nn.BatchNorm2d(channels) if batchnorm else nn.Identity()


def init_weights(model: nn.Module) -> None:
    """He initialisation for convolutions, unit BatchNorm, small linear layers (as in He et al. 2016)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.kaiming_uniform_(module.weight, a=5**0.5)
            nn.init.zeros_(module.bias)
