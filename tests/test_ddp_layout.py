"""DDP and the memory layout agree: no method makes DDP copy its gradients into its buckets.

DDP keeps each parameter's gradient in a bucket view with the parameter's strides; a gradient that autograd
returns in another layout ("Grad strides do not match bucket view strides") is copied into its bucket on
every step. kdray moves models to channels_last only on a GPU (contiguous on CPU), before DDP wraps them,
and feeds batches in the same layout. This trains every method for real in CPU's layout and in the GPU's
and checks that every gradient has its parameter's strides: the condition for DDP to copy nothing.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

import kdray.build
from kdray.build import build_stage, in_layout, model_info
from kdray.data import load_dataset
from kdray.distributed import local_context
from kdray.engine import fit
from kdray.models import ModelInfo, build_model
from kdray.resolve import load_config
from kdray.sinks import MemorySink
from kdray.stages import plan_stages

METHODS = {
    "none": [],
    "kd": [],
    "dkd": [],
    "dist": [],
    "triplet": [],
    "feature_mixup": [],
    "stkd": [],
    "takd": ["assistants.depth=1"],
    "dgkd": ["assistants.depth=1"],
    "online_branch": [],
    "dml": [],
    "pacemaker": ["student.onthefly=true"],
}


def mismatched(parameters: list[torch.nn.Parameter]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(parameter strides, gradient strides) of every gradient that DDP would have to copy."""
    return [(p.stride(), p.grad.stride()) for p in parameters if p.grad is not None and p.grad.stride() != p.stride()]


def test_the_check_finds_gradients_in_another_layout_than_their_parameters() -> None:
    model = build_model("resnet8", ModelInfo(10, 3, 16))  # contiguous parameters
    images = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)  # channels_last batch
    model(images).sum().backward()
    assert mismatched(list(model.parameters()))


def test_a_one_channel_batch_gets_the_strides_of_its_layout() -> None:
    gathered = torch.rand(4, 8, 8, 1).permute(0, 3, 1, 2).contiguous()  # as a crop gathered in NHWC comes out
    assert gathered.is_contiguous() and gathered.stride() == (64, 1, 8, 1)
    assert in_layout(gathered, torch.contiguous_format).stride() == (64, 64, 8, 1)
    assert torch.equal(in_layout(gathered, torch.contiguous_format), gathered)
    colour = torch.rand(4, 3, 8, 8)
    assert in_layout(colour, torch.contiguous_format) is colour  # already dense in its layout: no copy
    assert in_layout(colour, torch.channels_last).stride() == (192, 1, 24, 3)


@pytest.mark.integration
@pytest.mark.parametrize("layout", ["cpu", "gpu"], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_methods_gradients_have_their_parameters_layout(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, method: str, layout: str
) -> None:
    if layout == "gpu":  # the layout build_stage chooses on a GPU, chosen here on CPU
        monkeypatch.setattr(kdray.build, "memory_format", lambda ctx, train: torch.channels_last)
    cfg = load_config(
        None,
        [
            "teacher.name=plane4",
            "student.name=resnet8",
            "data.limit_train=128",
            "train.epochs=1",
            "train.batch_size=64",
            f"method.name={method}",
            *METHODS[method],
        ],
    )
    data = load_dataset(cfg.data)
    info = model_info(data)
    plans = plan_stages(cfg, data.fingerprint(), info=info)
    guides = [build_model(plan.model.name, replace(info, onthefly=plan.model.onthefly)) for plan in plans[:-1]]
    stage = build_stage(cfg, plans[-1], data, guides, local_context(False))
    assert stage.layout == (torch.channels_last if layout == "gpu" else torch.contiguous_format)
    fit(stage, MemorySink())
    trainable = list(stage.method.trainable())
    assert any(p.grad is not None for p in trainable)
    assert not mismatched(trainable)
