import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kdray.models import ModelInfo, build_model
from kdray.store import ModelStore, StoredModel, entry_problem, file_digest, model_key
from tests.faults import truncate, zero_in_place

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
    """Even an entry whose recorded hash matches (someone rewrote both) never unpickles code."""
    store = ModelStore(tmp_path)
    stored = store.save("evil", {}, "", {"model": {"name": "plane2"}, "metrics": {}})
    torch.save({"weights": torch.zeros(1), "payload": Path("x")}, stored.weights)  # not plain tensors
    meta = json.loads((stored.path / "meta.json").read_text())
    (stored.path / "meta.json").write_text(json.dumps({**meta, "weights_sha256": file_digest(stored.weights)}))
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        store.load("evil", INFO)


def _saved(store: ModelStore, key: str = "k") -> StoredModel:
    return store.save(key, build_model("plane2", INFO).state_dict(), "", {"model": {"name": "plane2"}, "metrics": {}})


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda entry: zero_in_place(entry / "model.pt"), r"model\.pt differs from what was stored"),
        (lambda entry: truncate(entry / "model.pt"), r"model\.pt differs from what was stored"),
        (lambda entry: (entry / "model.pt").write_bytes(b""), r"model\.pt differs from what was stored"),
        (lambda entry: (entry / "model.pt").unlink(), r"model\.pt is missing"),
        (lambda entry: truncate(entry / "meta.json"), r"meta\.json is unreadable"),
        (lambda entry: (entry / "meta.json").unlink(), r"meta\.json is missing"),
    ],
    ids=["zeroed", "truncated", "empty", "weights-gone", "meta-truncated", "meta-gone"],
)
def test_a_damaged_entry_is_quarantined_named_and_reported_missing(
    tmp_path: Path, damage: Callable[[Path], None], expected: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = ModelStore(tmp_path)
    entry = _saved(store).path
    damage(entry)
    with caplog.at_level(logging.WARNING, logger="kdray.store"):
        assert store.find("k") is None
    (warning,) = [record.getMessage() for record in caplog.records]
    assert re.search(expected, warning) and "entry k moved to" in warning and "\n" not in warning
    (aside,) = (tmp_path / ".quarantine").iterdir()  # kept for a post-mortem, never deleted
    assert aside.name.startswith("k-") and re.search(expected, (aside / "QUARANTINED.txt").read_text())
    assert not entry.exists() and store.keys() == []
    again = _saved(store)  # the stage trains again and stores its model under the same key
    assert store.find("k") == again


def test_an_entry_written_without_a_hash_is_not_trusted(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    entry = _saved(store).path
    meta = json.loads((entry / "meta.json").read_text())
    del meta["weights_sha256"]
    (entry / "meta.json").write_text(json.dumps(meta))
    assert store.find("k") is None  # its bytes cannot be checked: retrained rather than trusted
    (aside,) = (tmp_path / ".quarantine").iterdir()
    assert "records no content hash" in (aside / "QUARANTINED.txt").read_text()


def test_a_writer_replaces_a_damaged_entry_and_keeps_an_intact_one(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    first = _saved(store)
    zero_in_place(first.weights)
    second = _saved(store)  # finds the damaged entry in its way: quarantined, this one goes in
    assert store.find("k") == second and entry_problem(second.path) is None
    third = store.save("k", {}, "", {"model": {"name": "other"}, "metrics": {}})
    assert third.meta["model"] == {"name": "plane2"}  # an intact entry stays


def test_only_keys_are_looked_up(tmp_path: Path) -> None:
    """An empty key, a hidden folder or a path is never an entry: nothing is read there or moved aside."""
    store = ModelStore(tmp_path / "store")
    _saved(store)
    store.lock("k")  # creates .locks/
    for not_a_key in ("", ".locks", "../store", "k/.."):
        assert store.find(not_a_key) is None
    assert not (store.root / ".quarantine").exists() and store.find("k") is not None


def test_the_guide_output_cache_in_the_store_is_not_an_entry(tmp_path: Path) -> None:
    """It lives in the store folder by default: never listed, checked or moved aside as a damaged entry."""
    store = ModelStore(tmp_path / "store")
    _saved(store)
    (store.root / "guide-outputs" / "table").mkdir(parents=True)
    assert store.keys() == ["k"]
    assert store.find("guide-outputs") is None and store.quarantine("guide-outputs") is None
    assert (store.root / "guide-outputs" / "table").is_dir() and not (store.root / ".quarantine").exists()
