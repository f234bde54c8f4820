"""Runs of trials a killed search's saved state lacks: set aside on resume, taken over by the trial that draws
their values (``kdray.search.unrecorded``), against a real MLflow store. The whole kill and resume is
``tests/test_search.py::test_a_search_killed_three_times_resumes_each_time_and_ends_with_one_run_per_trial``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdray import tag_names as tag
from kdray.search.unrecorded import adopt, restored_trial_ids, set_aside
from kdray.store import ModelStore
from kdray.tracking import Tracker


def trial(tracker: Tracker, parent: str, trial_id: str, temperature: float) -> str:
    tags = {"kdray.role": "trial", tag.TRIAL_ID: trial_id, "kdray.sampled": json.dumps({"t": temperature})}
    return tracker.start_run(f"kd t={temperature} ({trial_id})", tags, parent)


def test_runs_of_unknown_trials_are_set_aside_and_taken_over_once_by_equal_values(workdir: Path) -> None:
    tracker = Tracker("sqlite:///mlflow.db", "aside")
    store = ModelStore(workdir / "store")
    parent = tracker.start_run("search", {"kdray.role": "search"})
    known = trial(tracker, parent, "aaaa0001", 4.0)
    finished = trial(tracker, parent, "aaaa0003", 6.25)
    tracker.end_run(finished)
    running = trial(tracker, parent, "aaaa0004", 2.5)

    assert sorted(set_aside(tracker, parent, {"aaaa0001"})) == sorted([finished, running])
    assert [run.info.run_id for run in tracker.runs_under(parent, role="trial")] == [known]
    statuses = {run.info.run_id: run.info.status for run in tracker.runs_under(parent, role="unrecorded_trial")}
    assert statuses == {finished: "FINISHED", running: "KILLED"}  # nothing will write to the running one again
    assert "last saved state" in tracker.tags(running)[tag.UNRECORDED]

    def take(trial_id: str, temperature: float) -> str | None:
        return adopt(tracker, store, parent, trial_id, {"t": temperature}, f"new ({trial_id})")

    assert take("bbbb0005", 7.0) is None  # values no set-aside run drew
    assert take("aaaa0001", 6.25) is None  # a trial Tune knew keeps its own run
    assert take("bbbb0003", 6.25) == finished
    tags = tracker.tags(finished)
    assert (tags["kdray.role"], tags[tag.TRIAL_ID], tags[tag.FIRST_TRIAL_ID]) == ("trial", "bbbb0003", "aaaa0003")
    assert tag.UNRECORDED not in tags and tracker.client.get_run(finished).info.run_name == "new (bbbb0003)"
    assert take("bbbb0006", 6.25) is None  # taken once: a second trial that draws the same values starts anew
    assert take("bbbb0003", 6.25) is None  # and its own trial, restarted, finds it by id


@pytest.mark.integration
def test_a_search_killed_before_tune_saved_anything_knows_no_trial(tmp_path: Path) -> None:
    assert restored_trial_ids(tmp_path) == set()
