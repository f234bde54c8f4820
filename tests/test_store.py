import json
from pathlib import Path

import pytest
import torch

from kdray.models import ModelInfo, build_model
from kdray.store import ModelStore, model_key

INFO = ModelInfo(num_classes=10, in_channels=1, image_size=8)


def test_key_is_stable_and_sensitive_to_every_field() -> None:
    identity = {"model": "resnet8", "train": {"seed": 0, "lr": 0.1}, "guides": ["abc"]}
    assert model_key(identity) == model_key({"guides": ["abc"], "train": {"lr": 0.1, "seed": 0}, "model": "resnet8"})
    assert model_key(identity) != model_key({**identity, "train": {"seed": 1, "lr": 0.1}})
    assert model_key(identity) != model_key({**identity, "guides": ["abd"]})


def test_miss_then_hit_round_trips_weights(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    assert store.find("k1") is None
    torch.manual_seed(0)
    model = build_model("resnet8", INFO)
    stored = store.save(
        "k1", model.state_dict(), "student:\n  name: resnet8\n", {"model": {"name": "resnet8"}, "metrics": {}}
    )
    assert store.find("k1") == stored
    assert json.loads((stored.path / "meta.json").read_text())["key"] == "k1"
    loaded = store.load("k1", INFO)
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True)
    )
    assert not list((tmp_path / "store").glob(".k1-*"))  # no staging folder left behind


def test_second_writer_keeps_the_first_entry(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    first = build_model("plane2", INFO).state_dict()
    store.save("same", first, "", {"model": {"name": "plane2"}, "metrics": {"val/acc": 1.0}})
    store.save(
        "same", build_model("plane2", INFO).state_dict(), "", {"model": {"name": "plane2"}, "metrics": {"val/acc": 0.0}}
    )
    assert store.find("same").meta["metrics"] == {"val/acc": 1.0}
    assert not list(tmp_path.glob(".same-*"))


def test_loading_refuses_pickled_code(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.save("evil", {}, "", {"model": {"name": "plane2"}, "metrics": {}})
    torch.save({"weights": torch.zeros(1), "payload": Path("x")}, store.find("evil").weights)  # not plain tensors
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        store.load("evil", INFO)
