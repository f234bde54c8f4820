"""``kdray evaluate`` and ``kdray export``: any model kdray stored or logged, used as its users will use it.

A model is named by an MLflow model URI (``models:/<name>/<version>``, ``models:/<model_id>``,
``runs:/<run>/model``) or by its model-store key; either way it becomes a ``Classifier`` that takes
float images in [0, 1], so what is measured here is what a user of the model gets.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from kdray.data import Dataset, eval_batches, on_device
from kdray.models import ModelInfo
from kdray.models.deploy import Classifier
from kdray.schema import ConfigError, DataConfig, ExperimentConfig
from kdray.store import open_store

STORE_KEY = re.compile(r"^[0-9a-f]{24}$")


def load_classifier(name: str, cfg: ExperimentConfig) -> Classifier:
    """The model ``name`` (an MLflow model URI or a store key of ``cfg.store.path``) as a ``Classifier``."""
    if STORE_KEY.match(name):
        return _from_store(name, cfg)
    import mlflow

    mlflow.set_tracking_uri(cfg.tracking.uri)
    try:
        model = mlflow.pytorch.load_model(name, map_location="cpu")
    except Exception as error:
        raise ConfigError(f"{name}: cannot load this MLflow model ({str(error).splitlines()[0]})") from None
    if not isinstance(model, Classifier):
        raise ConfigError(f"{name}: not a model kdray logged (a {type(model).__name__}); load it with mlflow directly")
    return model.eval()


def _from_store(key: str, cfg: ExperimentConfig) -> Classifier:
    store = open_store(cfg.store)
    stored = store.find(key)
    if stored is None:
        raise ConfigError(f"{key}: no such model in the store at {cfg.store.path} (set store.path)")
    channels, size, _ = stored.meta["image_shape"]
    model = store.load(key, ModelInfo(len(stored.meta["classes"]), channels, size))
    stats = stored.meta["input_stats"]  # the statistics it was trained (or given) with
    return Classifier(model, stats["mean"], stats["std"], stored.meta["classes"], (channels, size, size)).eval()


@torch.no_grad()
def accuracy(
    model: Classifier, dataset: Dataset, split: str, data: DataConfig, batch_size: int = 512
) -> tuple[float, int]:
    """Top-1 accuracy of ``model`` on ``split`` given as plain [0, 1] images; and the number of images."""
    chosen = {"train": dataset.train, "val": dataset.val, "test": dataset.test}[split]
    if chosen is None:
        raise ConfigError(f"--split {split}: the dataset has no {split} split")
    shape = chosen.image_shape
    if model.image_shape is not None and tuple(model.image_shape) != shape:
        raise ConfigError(
            f"the model takes {tuple(model.image_shape)} images, the data has {shape}; set data.image_size"
        )
    plain = on_device(chosen, (0.0,) * shape[0], (1.0,) * shape[0], torch.device("cpu"), data)  # [0, 1] images
    correct = 0
    for batch in eval_batches(plain, batch_size):
        correct += int((model(batch.images).argmax(1) == batch.labels).sum())
    return correct / len(chosen), len(chosen)


def export(model: Classifier, fmt: str, out: Path) -> None:
    """TorchScript (traced) or ONNX (torch.export-based exporter, batch size free) of ``model``."""
    if model.image_shape is None:
        raise ConfigError("this model does not record its input shape; log it again with this kdray")
    example = torch.rand(2, *model.image_shape)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torchscript":
        torch.jit.save(torch.jit.trace(model, example), str(out))
        return
    try:
        import onnxscript  # noqa: F401  (the exporter's dependency)
    except ImportError:
        raise ConfigError("--format onnx needs the onnx extra: pip install 'kdray[onnx]'") from None
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(model, (example,), str(out), dynamo=True, dynamic_shapes=({0: batch},), input_names=["images"],
                      output_names=["logits"])  # fmt: skip
