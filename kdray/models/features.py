"""One pass of a staged model that keeps what feature methods read: every stage's output and the embedding.

Kept out of ``staged.py`` on purpose: a stored model's key includes a digest of the code that defines its
architecture (``code_version``), and reading features changes no model's weights.
"""

from __future__ import annotations

import torch

from kdray.models.staged import StagedNet


def forward_features(model: StagedNet, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Logits, every stage's output by name, and the embedding: the classifier layer's input, flattened (the
    pooled features relation methods compare), all from one pass."""
    captured: list[torch.Tensor] = []
    hook = model.classifier.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        logits, stages = model(x, features=True)
    finally:
        hook.remove()
    return logits, stages, captured[-1].flatten(1)  # type: ignore[return-value]
