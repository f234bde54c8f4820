"""Architectures written elsewhere as kdray models: torchvision's, timm's, and a user's own callables.

kdray's methods address a model by named stages (``StagedNet``). A module whose forward is "body blocks
in order, then pool-and-classify" is split into stages without changing its computation: torchvision's
ResNet family (``avgpool`` + ``fc``) and its ``features`` + ``classifier`` families (MobileNet V2/V3,
EfficientNet, ConvNeXt, VGG, ...). The body's blocks are grouped by output resolution (one stage per
feature-map size, found by one probe pass), and the split model is checked against the module's own
forward on that probe: a module whose forward does something else (a user's model with its own logic)
is kept whole as a stage-less model, which methods that need only logits accept. timm models are one
stage (``forward_features``) and timm's own head (``forward_head``).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kdray.models.spec import ModelInfo, ModelSpec
from kdray.models.staged import StagedNet

POOL_NAMES = ("avgpool", "global_pool")


def torchvision_spec(name: str) -> ModelSpec:
    import torchvision
    from torchvision import models

    if name not in models.list_models(module=models):
        raise ValueError(f"unknown model 'torchvision.{name}'; see torchvision.models.list_models()")

    def build(info: ModelInfo) -> StagedNet:
        _need_colour(f"torchvision.{name}", info)
        return staged_from(models.get_model(name, weights=None, num_classes=info.num_classes), info)

    return _library_spec(build, "torchvision", torchvision.__version__, f"torchvision.models.{name}")


def timm_spec(name: str) -> ModelSpec:
    try:
        import timm
    except ImportError:
        raise ValueError(f"timm.{name}: timm is not installed; pip install 'kdray[timm]'") from None
    if not timm.is_model(name):
        raise ValueError(f"unknown model 'timm.{name}'; see timm.list_models()")

    def build(info: ModelInfo) -> StagedNet:
        model = timm.create_model(name, pretrained=False, num_classes=info.num_classes, in_chans=info.in_channels)
        return StagedNet([("features", TimmFeatures(model))], TimmHead(model), _names(model, "stages.features.model."))

    return _library_spec(build, "timm", timm.__version__, f"timm.create_model('{name}')")


def _library_spec(build: Callable[[ModelInfo], StagedNet], library: str, version: str, call: str) -> ModelSpec:
    """A library's architecture: its version (and this module's splitting code) decide the weights."""
    return ModelSpec(
        build, f"{library} {version} {call}", onthefly=False, native=False, code=(__name__,),
        version_tag=f"{library}-{version}",
    )  # fmt: skip


def import_callable(target: str) -> Callable[..., Any]:
    """``package.module:attribute`` (dots allowed after the colon), imported; ValueError saying what is missing."""
    module_name, _, attribute = target.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"model '{target}': cannot import {module_name} ({error})") from None
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise ValueError(f"model '{target}': {module_name} has no attribute {attribute}")
        found = getattr(found, part)
    if not callable(found):
        raise ValueError(f"model '{target}': {attribute} is not callable")
    return found


def callable_spec(target: str, factory: Callable[..., Any]) -> ModelSpec:
    """A user's function or class returning an ``nn.Module``, called with the arguments it accepts of
    ``num_classes``, ``in_channels`` and ``image_size``."""

    def build(info: ModelInfo) -> StagedNet:
        accepted = inspect.signature(factory).parameters
        wanted = {"num_classes": info.num_classes, "in_channels": info.in_channels, "image_size": info.image_size}
        takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
        module = factory(**{k: v for k, v in wanted.items() if takes_all or k in accepted})
        if not isinstance(module, nn.Module):
            raise ValueError(f"model '{target}' returned {type(module).__name__}, not a torch.nn.Module")
        return staged_from(module, info)

    return ModelSpec(build, target, onthefly=False, native=False, code=(factory.__module__, __name__))


def staged_from(module: nn.Module, info: ModelInfo) -> StagedNet:
    """``module`` split into stages when its forward is body-then-head (checked on a probe), else whole."""
    if isinstance(module, StagedNet):
        return module
    split = _body_and_head(module)
    if split is not None:
        body, head = split
        probe = torch.rand(2, info.in_channels, info.image_size, info.image_size)
        stages = _group_by_resolution(body, probe)
        staged = StagedNet([(f"stage{i}", nn.Sequential(*group)) for i, group in enumerate(stages, 1)], head)
        if _same_function(module, staged, probe):
            staged.source_names = _names(module, "", staged)
            return staged
    whole = StagedNet([], module)
    whole.source_names = _names(module, "head.")
    return whole


def _body_and_head(module: nn.Module) -> tuple[list[nn.Module], nn.Module] | None:
    children = dict(module.named_children())
    pool = next((children[name] for name in POOL_NAMES if name in children), None)
    if "fc" in children and pool is not None:  # torchvision ResNet, ResNeXt, Wide ResNet, RegNet
        body = [child for name, child in children.items() if name not in (*POOL_NAMES, "fc")]
        return body, nn.Sequential(pool, nn.Flatten(1), children["fc"])
    features, classifier = children.get("features"), children.get("classifier")
    if isinstance(features, nn.Sequential) and classifier is not None:  # MobileNet, EfficientNet, ConvNeXt, VGG
        flattens = any(isinstance(m, nn.Flatten) for m in classifier.modules())
        head = [pool or nn.AdaptiveAvgPool2d(1), *([] if flattens else [nn.Flatten(1)]), classifier]
        return list(features.children()), nn.Sequential(*head)
    return None


@torch.no_grad()
def _group_by_resolution(body: list[nn.Module], probe: torch.Tensor) -> list[list[nn.Module]]:
    """Consecutive blocks whose outputs have the same spatial size form one stage."""
    groups: list[list[nn.Module]] = []
    size = None
    x = probe
    training = [block.training for block in body]
    for block in body:
        block.eval()
        x = block(x)
        new_size = tuple(x.shape[2:])
        if not groups or new_size != size:
            groups.append([])
        groups[-1].append(block)
        size = new_size
    for block, mode in zip(body, training, strict=True):
        block.train(mode)
    return groups


@torch.no_grad()
def _same_function(original: nn.Module, staged: StagedNet, probe: torch.Tensor) -> bool:
    mode = original.training
    original.eval()
    try:
        expected = original(probe)
        return isinstance(expected, torch.Tensor) and torch.allclose(staged(probe), expected, atol=1e-5)
    except Exception:  # a forward that does not take the split's shapes is not body-then-head
        return False
    finally:
        original.train(mode)


def _names(module: nn.Module, prefix: str, staged: nn.Module | None = None) -> dict[str, str]:
    """The module's parameter and buffer names -> the staged model's (found by tensor identity)."""
    if staged is None:
        return {name: prefix + name for name in module.state_dict()}
    where = {id(tensor): name for name, tensor in staged.state_dict(keep_vars=True).items()}
    return {
        name: where[id(tensor)] for name, tensor in module.state_dict(keep_vars=True).items() if id(tensor) in where
    }


def _need_colour(name: str, info: ModelInfo) -> None:
    if info.in_channels != 3:
        raise ValueError(f"{name} takes colour images but the data has {info.in_channels} channel(s)")


class TimmFeatures(nn.Module):
    """A timm model up to its last feature map (``forward_features``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


class TimmHead(nn.Module):
    """timm's own pooling and classifier (``forward_head``) of the model ``TimmFeatures`` owns; the model is
    held outside the module tree so its weights are listed once."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.__dict__["model"] = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(x)
