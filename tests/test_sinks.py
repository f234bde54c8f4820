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


@pytest.mark.integration
def test_the_last_epoch_is_logged_before_the_model_is_stored(workdir: Path) -> None:
    """Storing the model ends the stage's run FINISHED, and ``fit`` hands the model over before the last
    epoch's report. Its metrics must already be logged then: a trial process killed right after the store left
    a finished run without them, and the resumed search reported the epoch before's accuracy as the trial's
    (found by tests/test_search.py::
    test_a_search_killed_three_times_resumes_each_time_and_ends_with_one_run_per_trial)."""
    from kdray.build import build_stage
    from kdray.data import load_dataset
    from kdray.distributed import local_context
    from kdray.engine import fit
    from kdray.resolve import load_config
    from kdray.stages import plan_stages

    cfg = load_config(None, ["train.epochs=2", "student.name=plane2", "method.name=none", "train.batch_size=64"])
    data = load_dataset(cfg.data)
    (plan,) = plan_stages(cfg, data.fingerprint())
    logger = Epochs()
    logged_when_stored: list[int] = []
    local = LocalSink(workdir / "stage", logger, lambda result: logged_when_stored.extend(logger.steps), every=1,
                      epochs=2, device=torch.device("cpu"))  # fmt: skip
    fit(build_stage(cfg, plan, data, [], local_context(False)), local)
    assert logged_when_stored == [1, 2]
    assert logger.steps == [1, 2]  # the last epoch once, not again from its end_epoch
