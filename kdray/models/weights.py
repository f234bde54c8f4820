"""Loading weights someone else saved into a kdray model, with one clear error when they do not fit."""

from __future__ import annotations

import torch

from kdray.models.staged import StagedNet


class WeightsError(ValueError):
    """Weights that do not fit an architecture; the message is one line naming what differs."""


def load_weights(model: StagedNet, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load ``state`` into ``model``: its own parameter names, or those of the module it was built from
    (``StagedNet.source_names``), with DataParallel/DDP's ``module.`` prefix dropped."""
    if state and all(name.startswith("module.") for name in state):
        state = {name.removeprefix("module."): tensor for name, tensor in state.items()}
    own = model.state_dict()
    if set(state) != set(own) and set(state) == set(model.source_names):
        state = {model.source_names[name]: tensor for name, tensor in state.items()}
    missing = [name for name in own if name not in state]
    unexpected = [name for name in state if name not in own]
    if missing or unexpected:
        raise WeightsError(
            f"{origin}: the weights do not fit this architecture ({len(missing)} of its tensors missing, e.g. "
            f"{missing[:2]}; {len(unexpected)} unknown, e.g. {unexpected[:2]}); check the model name"
        )
    for name, tensor in own.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise WeightsError(
                f"{origin}: {name} is {tuple(state[name].shape)} in the weights but {tuple(tensor.shape)} in the "
                "model; check the model name and that its classes match the data"
            )
    model.load_state_dict(state)
