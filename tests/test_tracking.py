"""``Tracker.run``: whatever happens inside the block, the run does not stay RUNNING (a real sqlite MLflow store)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kdray import tag_names as tag
from kdray.tracking import Tracker


@pytest.fixture
def tracker(tmp_path: Path, mlflow_template: Path) -> Tracker:
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")  # migrated once per session
    return Tracker(f"sqlite:///{tmp_path}/mlflow.db", "runs")


def status(tracker: Tracker, run_id: str) -> str:
    return tracker.client.get_run(run_id).info.status


def test_a_block_that_returns_ends_its_run_finished(tracker: Tracker) -> None:
    with tracker.run(tracker.start_run("stage", {})) as run_id:
        assert status(tracker, run_id) == "RUNNING"
    assert status(tracker, run_id) == "FINISHED"


def test_a_block_that_raises_ends_its_run_failed_with_the_error_and_the_error_goes_on(tracker: Tracker) -> None:
    run_id = tracker.start_run("stage", {})
    with pytest.raises(ValueError, match="bad batch"), tracker.run(run_id):
        raise ValueError("bad batch")
    assert status(tracker, run_id) == "FAILED"
    assert tracker.tags(run_id)[tag.ERROR] == "ValueError: bad batch"


def test_ctrl_c_inside_ends_the_run_killed(tracker: Tracker) -> None:
    run_id = tracker.start_run("stage", {})
    with pytest.raises(KeyboardInterrupt), tracker.run(run_id):
        raise KeyboardInterrupt
    assert status(tracker, run_id) == "KILLED"


def test_nested_runs_each_end_failed_inner_first(tracker: Tracker) -> None:
    parent = tracker.start_run("experiment", {})
    child = tracker.start_run("teacher", {}, parent)
    with pytest.raises(RuntimeError), tracker.run(parent), tracker.run(child, finish=False):
        raise RuntimeError("out of memory")
    assert (status(tracker, child), status(tracker, parent)) == ("FAILED", "FAILED")
    ends = [tracker.client.get_run(run).info.end_time for run in (child, parent)]
    assert ends[0] <= ends[1]


def test_a_run_handed_on_is_left_running_when_the_block_returns(tracker: Tracker) -> None:
    with tracker.run(tracker.start_run("trial", {}), finish=False) as run_id:
        pass
    assert status(tracker, run_id) == "RUNNING"


def test_a_broken_store_does_not_hide_the_error(tracker: Tracker, tmp_path: Path) -> None:
    run_id = tracker.start_run("stage", {})
    (tmp_path / "mlflow.db").unlink()  # the store is gone when the failure is recorded
    with pytest.raises(ValueError, match="the real problem"), tracker.run(run_id):
        raise ValueError("the real problem")
