"""Trials a killed search started after Tune last saved its state, and how a resumed search takes them back.

Tune saves a search's state (its trials and the searcher's) every few seconds, not on every trial start, so a
driver killed between two saves leaves MLflow runs of trials that ``Tuner.restore`` does not know. The
restored searcher is also back at that save: it draws those trials' values again, under new Tune trial ids.
On resume the driver sets such runs aside (role ``unrecorded_trial``, closed with the reason), and a new
trial that drew the same values takes one over as its own run instead of starting a second one: a finished
one reports what it found, an interrupted one continues from its checkpoint, and its metric history goes on
where it stopped. A set-aside run whose values are never drawn again stays aside, out of the search's report.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdray import run_storage
from kdray import tag_names as tag
from kdray.store import ModelStore
from kdray.tracking import Tracker

TRIAL_ROLE = "trial"
UNRECORDED_ROLE = "unrecorded_trial"
UNRECORDED_WHY = (
    "started after the search's last saved state, so the resumed search does not know this trial; "
    "a resumed trial that draws the same values continues this run"
)


def tune_saved_a_state(folder: str | Path) -> bool:
    """Whether Tune saved an experiment state (its trials) under ``folder``: it does once the trials start, not
    when the Tuner is made, so a driver killed while the shared guides trained leaves none."""
    return bool(run_storage.names(str(folder), "experiment_state-*.json"))


def restored_trial_ids(folder: str | Path) -> set[str]:
    """The ids of the trials in the last state Tune saved under ``folder`` (a local folder or a bucket's URI):
    those a restored search knows."""
    from ray.tune import ExperimentAnalysis

    if not tune_saved_a_state(folder):
        return set()  # killed before Tune first saved (while shared guides trained): no trial is known
    quiet = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it warns of every trial with no result yet, which is no fault here
    try:
        return {trial.trial_id for trial in ExperimentAnalysis(str(folder)).trials}
    finally:
        quiet.setLevel(level)


@dataclass(frozen=True)
class Realignment:
    """What ``align_searcher_with_trials`` changed: the searcher's trial count before and after, and the trials
    of the saved list that the saved searcher had never seen (left out of the restored search)."""

    count_before: int
    count_after: int
    unseen: tuple[str, ...]


def align_searcher_with_trials(folder: str) -> Realignment | None:
    """Make the searcher's saved state and the saved trial list agree before ``Tuner.restore`` reads them.

    Tune saves a search's trials (``experiment_state-<session>.json``), its searcher's count of the trials it
    created (``search_gen_state-<session>.json``) and the searcher itself (``searcher-state-<session>.pkl``,
    Optuna's trials by Tune trial id) as separate files, uploaded one after the other when the storage is a
    bucket. A driver killed between the uploads leaves them out of step, and either way the resumed search
    goes wrong:

    - a list with trials the searcher never saw: the restored searcher fails on the first result of one
      (``KeyError`` in ``OptunaSearch.on_trial_result``) and the resumed search dies. Those trials are left out
      of the restored list; their MLflow runs are set aside as unrecorded, and the searcher, back at its saved
      state, draws their values again, so a new trial takes the run over (module docstring);
    - a count ahead of the list (trials suggested after the list was saved): the restored search would
      believe them created and end with fewer trials than ``search.num_samples``, saying nothing. The count is
      set to the trials the restored search knows, so it creates the missing ones.

    Returns what it changed, or None when the state was consistent."""
    import ray.cloudpickle as cloudpickle

    states = run_storage.names(folder, "experiment_state-*.json")
    if not states:
        return None
    newest = states[-1]  # the names end in the session's start time
    session = newest.removeprefix("experiment_state-").removesuffix(".json")
    counter_file = run_storage.join(folder, f"search_gen_state-{session}.json")
    searcher_file = run_storage.join(folder, f"searcher-state-{session}.pkl")
    if not run_storage.exists(counter_file):
        return None
    state_file = run_storage.join(folder, newest)
    experiment = json.loads(run_storage.read_text(state_file))
    listed = {_trial_id(entry): entry for entry in experiment["trial_data"]}
    if run_storage.exists(searcher_file):
        seen = set(cloudpickle.loads(run_storage.read_bytes(searcher_file)).get("_ot_trials", {}))
    else:
        seen = set(listed)
    unseen = tuple(trial_id for trial_id in listed if trial_id not in seen)
    if unseen:
        kept = [entry for trial_id, entry in listed.items() if trial_id in seen]
        run_storage.write_text(state_file, json.dumps({**experiment, "trial_data": kept}))
    trials = len(listed) - len(unseen)
    counter = cloudpickle.loads(run_storage.read_bytes(counter_file))
    before = counter["counter"]
    if before == trials and not unseen:
        return None
    counter["counter"], counter["finished"] = trials, trials >= counter["total_samples"]
    run_storage.write_bytes(counter_file, cloudpickle.dumps(counter))
    return Realignment(before, trials, unseen)


def _trial_id(entry: list[str]) -> str:
    """The Tune trial id of one ``trial_data`` entry of a saved experiment state (trial JSON, runtime JSON)."""
    return json.loads(entry[0])["trial_id"]


def runs_of_trial(tracker: Tracker, parent: str, trial_id: str) -> list[Any]:
    """The runs under the search run ``parent`` that Tune trial ``trial_id`` opened or took over (at most one)."""
    return tracker.runs({tag.TRIAL_ID: trial_id, tag.PARENT_RUN_ID: parent})


def set_aside(tracker: Tracker, parent: str, known: set[str]) -> list[str]:
    """Give the trial runs under ``parent`` whose trial Tune does not know the role ``unrecorded_trial``, with
    the reason; one still RUNNING (its process died with the driver) ends KILLED. Their run ids."""
    aside = []
    for run in tracker.runs_under(parent, role=TRIAL_ROLE):
        if run.data.tags.get(tag.TRIAL_ID) in known:
            continue
        tracker.set_tags(run.info.run_id, {tag.ROLE: UNRECORDED_ROLE, tag.UNRECORDED: UNRECORDED_WHY})
        if run.info.status == "RUNNING":
            tracker.end_run(run.info.run_id, "KILLED")
        aside.append(run.info.run_id)
    return aside


def adopt(
    tracker: Tracker, store: ModelStore, parent: str, trial_id: str, sampled: dict[str, Any], label: str
) -> str | None:
    """Make a set-aside run that sampled exactly ``sampled`` the run of trial ``trial_id`` (unless that trial
    has a run already), renamed ``label``; its id, or None. Under a lock, so two trials that drew the same
    values never take the same run."""
    with store.lock(f"adopt-{parent}"):
        if runs_of_trial(tracker, parent, trial_id):
            return None
        for run in tracker.runs_under(parent, role=UNRECORDED_ROLE):
            if json.loads(run.data.tags.get(tag.SAMPLED, "null")) != sampled:
                continue
            run_id = run.info.run_id
            first = run.data.tags.get(tag.FIRST_TRIAL_ID, run.data.tags[tag.TRIAL_ID])
            tracker.set_tags(run_id, {tag.ROLE: TRIAL_ROLE, tag.TRIAL_ID: trial_id, tag.FIRST_TRIAL_ID: first})
            tracker.delete_tag(run_id, tag.UNRECORDED)
            tracker.rename(run_id, label)
            return run_id
    return None
