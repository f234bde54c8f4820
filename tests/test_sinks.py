"""Checkpoints of an unfinished stage: a damaged one must not fail every rerun."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from kdray.sinks import LocalSink
from tests.faults import truncate, zero_in_place


class Epochs:
    """A metric logger that remembers what it was given."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.steps.append(step)


def sink(folder: Path, logger: Epochs) -> LocalSink:
    return LocalSink(folder, logger, None, every=1, epochs=5, device=torch.device("cpu"))


def test_a_checkpoint_is_restored_with_its_epochs(tmp_path: Path) -> None:
    first = sink(tmp_path / "stage", Epochs())
    first.end_epoch(1, {"val/acc": 0.5}, lambda: {"epoch": 1, "history": [{"val/acc": 0.5}], "w": torch.ones(3)})
    logger = Epochs()
    state = sink(tmp_path / "stage", logger).restore()
    assert state is not None and state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert logger.steps == [1]


@pytest.mark.parametrize("damage", [truncate, zero_in_place, lambda path: path.write_bytes(b"")])
def test_an_unreadable_checkpoint_is_set_aside_and_the_stage_starts_over(
    tmp_path: Path, damage: object, caplog: pytest.LogCaptureFixture
) -> None:
    first = sink(tmp_path / "stage", Epochs())
    state = {"epoch": 2, "history": [{"val/acc": 0.5}] * 2, "w": torch.ones(1000)}
    first.end_epoch(2, {"val/acc": 0.5}, lambda: state)
    damage(tmp_path / "stage" / "state.pt")  # type: ignore[operator]
    with caplog.at_level(logging.WARNING, logger="kdray.sinks"):
        again = sink(tmp_path / "stage", Epochs())
        assert again.restore() is None and again.resumed_from is None  # from epoch 1, not a traceback
    (warning,) = [record.getMessage() for record in caplog.records]
    assert "state.pt is unreadable" in warning and "training this stage from its first epoch" in warning
    assert not (tmp_path / "stage" / "state.pt").exists()
    assert len(list((tmp_path / "stage").glob("state.unreadable-*.pt"))) == 1  # kept, out of the way
