"""Models a user brings already trained (``teacher.weights``, ``assistants.weights``): read, checked against
the architecture, hashed.

A given model is never trained by kdray. Its stage is evaluated on the experiment's data (val/test in
its MLflow run) and stored under a key made of the hash of its weights, so two searches that name the
same file (or the same MLflow model) share its store entry and its guide-output cache. Weights come as

- a state-dict file (``torch.save(model.state_dict(), path)``, also with DDP's ``module.`` prefix or inside a
  ``{"state_dict": ...}`` checkpoint), loaded with ``weights_only=True``, which never runs pickled code;
- an MLflow model URI (``runs:/<run>/<name>``, ``models:/<name>/<version>``, ``models:/<model_id>``): a model
  kdray logged brings its own input statistics;
- ``pretrained`` or ``pretrained:<TAG>`` for a torchvision or timm architecture (downloaded: needs internet).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from kdray.guide_cache import weights_fingerprint
from kdray.models import ModelInfo, StagedNet, build_model, load_weights
from kdray.models.deploy import Classifier
from kdray.schema import ConfigError, ExperimentConfig, ModelConfig

Stats = tuple[tuple[float, ...], tuple[float, ...]]


@dataclass(frozen=True)
class GivenModel:
    """Weights that fit the architecture, their content hash, and the input statistics they expect (None:
    the data's)."""

    model: StagedNet
    digest: str
    stats: Stats | None


def given_weights(cfg: ExperimentConfig, role: str, model: ModelConfig) -> tuple[str, str, Stats | None] | None:
    """Where the weights of stage ``role`` (``teacher``, ``assistant<k>``) of architecture ``model`` are given:
    (source, config field, input statistics the config states), or None when kdray trains that stage."""
    if role == "teacher" and cfg.teacher.weights is not None:
        mean, std = cfg.teacher.input_mean, cfg.teacher.input_std
        return cfg.teacher.weights, "teacher.weights", (tuple(mean), tuple(std)) if mean and std else None
    if role.startswith("assistant") and model.name in cfg.assistants.weights:
        return cfg.assistants.weights[model.name], f"assistants.weights.{model.name}", None
    return None


def given_model(cfg: ExperimentConfig, role: str, model: ModelConfig, info: ModelInfo) -> GivenModel:
    """The given model of stage ``role`` for data described by ``info``; ConfigError (one line) when it cannot be."""
    given = given_weights(cfg, role, model)
    assert given is not None, f"the {role} is not given"
    source, field, own = given
    shape = replace(info, onthefly=model.onthefly, batchnorm=model.batchnorm)
    return _given(model.name, source, field, shape, cfg.tracking.uri, own)


@functools.cache
def _given(name: str, source: str, field: str, info: ModelInfo, tracking_uri: str, own: Stats | None) -> GivenModel:
    """Read once per process (a search's driver and each trial's planning ask again)."""
    try:
        state, stats = _read(name, source, tracking_uri)
        model = build_model(name, info)
        load_weights(model, state, source)
    except ValueError as error:  # ConfigError and WeightsError among them
        raise ConfigError(f"{field}: {error}") from None
    stats = own or stats
    if stats is not None and len(stats[0]) != info.in_channels:
        raise ConfigError(f"{field}: input statistics of {len(stats[0])} channels, images of {info.in_channels}")
    return GivenModel(model.eval(), weights_fingerprint(model), stats)


def _read(name: str, source: str, tracking_uri: str) -> tuple[dict[str, torch.Tensor], Stats | None]:
    if source.startswith("pretrained"):
        return _pretrained(name, source.partition(":")[2])
    if source.startswith(("runs:/", "models:/")) or "://" in source:
        return _from_mlflow(source, tracking_uri)
    return _from_file(Path(source)), None


def _from_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file, another format, or one holding pickled code
        raise ConfigError(
            f"cannot read {path} as a state dict ({type(error).__name__}); save one with "
            "torch.save(model.state_dict(), path)"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path} is not a state dict; save it with torch.save(model.state_dict(), path)")
    return state


def _from_mlflow(uri: str, tracking_uri: str) -> tuple[dict[str, torch.Tensor], Stats | None]:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    try:
        module = mlflow.pytorch.load_model(uri, map_location="cpu")
    except Exception as error:
        raise ConfigError(f"cannot load the MLflow model {uri} ({str(error).splitlines()[0]})") from None
    if isinstance(module, Classifier):
        stats = (tuple(module.mean.flatten().tolist()), tuple(module.std.flatten().tolist()))
        return module.model.state_dict(), stats
    return module.state_dict(), None


def _pretrained(name: str, tag: str) -> tuple[dict[str, torch.Tensor], Stats | None]:
    """torchvision's or timm's published weights; their own normalisation comes with them."""
    try:
        if name.startswith("torchvision."):
            from torchvision import models

            weights = models.get_model_weights(name.removeprefix("torchvision."))[tag or "DEFAULT"]
            transforms = weights.transforms()
            return weights.get_state_dict(progress=False), (tuple(transforms.mean), tuple(transforms.std))
        if name.startswith("timm."):
            import timm

            model = timm.create_model(name.removeprefix("timm.") + (f".{tag}" if tag else ""), pretrained=True)
            config = model.pretrained_cfg
            return model.state_dict(), (tuple(config["mean"]), tuple(config["std"]))
    except KeyError:
        raise ConfigError(f"{name} has no pretrained weights tagged '{tag}'") from None
    except OSError as error:  # urllib's URLError and huggingface_hub's connection errors are OSErrors
        raise ConfigError(
            f"downloading {name}'s pretrained weights failed ({error}); this needs internet: "
            "download them where there is some and give the file"
        ) from None
    raise ConfigError(f"pretrained weights exist for torchvision.<name> and timm.<name>, not {name}")
