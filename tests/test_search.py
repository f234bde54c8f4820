"""`kdray tune` for real: a local Ray instance, Ray Tune with OptunaSearch and ASHA, a sqlite MLflow store.

Everything is read back from MLflow with MlflowClient, as a user reviewing the search would.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import mlflow
import optuna
import pytest
import ray
from mlflow import MlflowClient

from kdray.data import load_dataset
from kdray.engine import TrainingDiverged
from kdray.resolve import load_config
from kdray.schema import ConfigError
from kdray.search.driver import run_search
from kdray.search.unrecorded import restored_trial_ids
from kdray.store import ModelStore
from tests.conftest import alive, process_tree

SMALL = [
    "teacher.name=plane4",
    "teacher.epochs=2",
    "student.name=plane2",
    "train.batch_size=64",
    "scaling.threads=1",
    "search.max_concurrent_trials=2",
    "search.references=false",
]


def write_experiment(folder: Path, search: dict) -> Path:
    """A YAML experiment whose search section is ``search`` (overrides go on the command line)."""
    file = folder / "search.yaml"
    file.write_text(json.dumps({"search": search}))  # JSON is YAML
    return file


def runs_by_role(uri: str, experiment: str) -> dict[str, list]:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=1000) if found else []  # none before its first run
    grouped: dict[str, list] = {}
    for run in runs:
        grouped.setdefault(run.data.tags.get("kdray.role", "?"), []).append(run)
    return grouped


@pytest.mark.integration
def test_search_over_methods_with_asha_records_one_parent_and_a_child_per_trial(
    local_ray: None, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    space = {
        "method.name": {"kind": "choice", "values": ["kd", "triplet", "stkd"]},
        "method.temperature": {"kind": "logfloat", "low": 1, "high": 8},
        "method.margin": {"kind": "float", "low": 0.5, "high": 5},
        "method.alpha": {"kind": "float", "low": 0.2, "high": 2, "methods": ["stkd"]},
    }
    cfg = load_config(
        write_experiment(workdir, {"space": space}),
        [
            *SMALL,
            "train.epochs=4",
            "search.num_samples=6",
            "search.name=methods",
            "search.scheduler.grace_period=1",
            "search.references=true",
            "tracking.experiment=kdray-quickstart",  # the README's name for the registered student
        ],
    )
    outcome = run_search(cfg, "unused")
    shown = capsys.readouterr().out  # the live table, as the terminal (or `| tee`) showed it
    assert "search methods: 6/6 trials ended (" in shown and "stopped early" in shown and "best val/acc" in shown
    # the search is kept as an Optuna study beside the MLflow store, for optuna-dashboard
    study = optuna.load_study(study_name="methods", storage=f"sqlite:///{workdir / 'optuna.db'}")
    assert len(study.trials) == 6 and outcome.optuna_storage == f"sqlite:///{workdir / 'optuna.db'}"
    assert study.best_value == max(row.value for row in outcome.report.rows)
    client = MlflowClient(cfg.tracking.uri)
    runs = runs_by_role(cfg.tracking.uri, "kdray-quickstart")
    (parent,) = runs["search"]
    assert parent.info.run_id == outcome.parent_run_id and client.get_run(parent.info.run_id).info.status == "FINISHED"
    trials = [run for run in runs["trial"] if run.data.tags["mlflow.parentRunId"] == parent.info.run_id]
    assert len(trials) == len(runs["trial"]) == 6
    for trial in trials:
        sampled = json.loads(trial.data.tags["kdray.sampled"])
        method = sampled["method.name"]
        assert trial.data.params["method.name"] == method
        # conditional space: each parameter only where it means something
        expected = {"method.name", "method.temperature"} | {"triplet": {"method.margin"}, "stkd": {"method.alpha"}}.get(
            method, set()
        )
        assert set(sampled) == expected, (method, sampled)
        assert ("method.margin" in trial.data.params) == (method == "triplet")
        for key, value in sampled.items():
            assert trial.data.params[key] == str(value)
        # named by method and sampled values (the winner's name carries the mark), then the id the live table shows
        name = trial.info.run_name.removeprefix("★ best: ")
        short_id = trial.data.tags["kdray.trial_id"].rsplit("_", 1)[-1]
        assert name.startswith(f"{method} temperature=") and name.endswith(f"({short_id})")
    # the defaults of every method are evaluated first
    first = sorted(trials, key=lambda run: run.info.start_time)[:3]
    defaults = {json.loads(run.data.tags["kdray.sampled"])["method.name"]: run for run in first}
    assert set(defaults) == {"kd", "triplet", "stkd"}
    assert json.loads(defaults["kd"].data.tags["kdray.sampled"])["method.temperature"] == 4.0
    assert json.loads(defaults["triplet"].data.tags["kdray.sampled"])["method.margin"] == 5.0
    # ASHA stopped at least one trial, and says so in its run, which is not shown as failed (FINISHED, not KILLED)
    stopped = [run for run in trials if "kdray.stopped" in run.data.tags]
    assert stopped and all("stopped by ASHA" in run.data.tags["kdray.stopped"] for run in stopped)
    assert {client.get_run(run.info.run_id).info.status for run in trials} == {"FINISHED"}
    assert all("Stopped early" in run.data.tags["mlflow.note.content"] for run in stopped)
    for run in stopped:
        epochs = [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")]
        assert epochs == list(range(1, max(epochs) + 1)) and max(epochs) < 4
    # trial processes are reused (search.reuse_actors): a later trial ran in the process of a stopped one
    processes = Counter(run.data.tags["kdray.process"] for run in trials)
    assert len(processes) < len(trials), processes
    assert any(
        other.data.tags["kdray.process"] == run.data.tags["kdray.process"]
        and other.info.start_time > run.info.start_time
        for run in stopped
        for other in trials
    ), [(run.info.run_name, run.data.tags["kdray.process"]) for run in trials]
    # shared guides first: the teacher every trial needs was trained once, under the search run, with both
    # slots' CPUs, before any trial started; every trial reused it
    assert "shared guides first: training teacher plane4 with 2 CPUs in this process before the trials start" in shown
    (teacher,) = [run for run in runs["teacher"] if run.data.tags["kdray.reused"] == "false"]
    assert teacher.data.tags["mlflow.parentRunId"] == parent.info.run_id and teacher.data.tags["kdray.shared_guide"]
    assert teacher.info.end_time <= min(trial.info.start_time for trial in trials)
    assert {(t.data.tags["kdray.models_trained"], t.data.tags["kdray.models_reused"]) for t in trials} == {("0", "1")}
    assert ModelStore(cfg.store.path).find(teacher.data.tags["kdray.model_key"]) is not None
    # how much of the trial slots' time went into training, on the search run
    search_metrics = client.get_run(parent.info.run_id).data.metrics
    assert 0 < search_metrics["search/utilisation"] <= 1 and search_metrics["search/slots"] == 2
    assert search_metrics["search/shared_guides_s"] > 0
    # the references (student alone, default KD) are nested under the search, named as what they are
    references = {run.data.tags["method"]: run.info.run_name for run in runs["reference"]}
    assert references == {"none": "reference: student alone", "kd": "reference: default KD"}
    assert outcome.report.counts["trials"] == 6
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/methods.png", "plots/metric_vs_params.png"} <= artifacts
    summary = client.download_artifacts(parent.info.run_id, "summary.md", str(workdir))
    text = Path(summary).read_text()
    assert "student alone, same budget" in text and "default KD, same budget" in text and "stopped by ASHA" in text
    assert "1 trained before the trials (shared by all), 0 trained by trials, 6 reused" in text
    assert "Time: trials spent " in text and "shared guides trained first in " in text
    # the best finished student is registered and loads as a plain classifier: [0, 1] images in, the logged
    # test accuracy out, and the README's snippet runs as written
    assert outcome.registered == "models:/kdray-quickstart-student/1"
    version = client.get_model_version("kdray-quickstart-student", "1")
    student = mlflow.pytorch.load_model("models:/kdray-quickstart-student/1")
    test = load_dataset(cfg.data).test
    raw = (student(test.images.float() / 255).argmax(1) == test.labels).float().mean().item()
    assert raw == pytest.approx(client.get_run(version.run_id).data.metrics["test/acc"])
    assert version.run_id in {run.info.run_id for run in [*trials, *runs.get("student", [])]}
    snippet = readme_block("## Using your student", "python")
    shown = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, check=True).stdout
    assert str(student.classes) in shown
    # the winner is marked on its run and linked from the search run's description
    best = outcome.report.best
    assert best is not None and client.get_run(best.run_id).data.tags["kdray.winner"] == "true"
    marked = [run for run in trials if client.get_run(run.info.run_id).info.run_name.startswith("★ best: ")]
    assert [run.info.run_id for run in marked] == [best.run_id]
    parent_tags = client.get_run(parent.info.run_id).data.tags
    assert f"/runs/{best.run_id})" in parent_tags["mlflow.note.content"]
    assert parent_tags["best.method.name"] == best.method
    # the search run holds its best value under the metric's own name: the runs table ranks it among experiments
    assert client.get_run(parent.info.run_id).data.metrics["val/acc"] == best.value


@pytest.mark.slow
def test_a_search_compares_logit_and_feature_methods_each_with_its_own_knobs(local_ray: None, workdir: Path) -> None:
    """method.name over kd, dkd and three feature methods: every method's defaults first, then draws; a knob only
    reaches the methods it names, and every trial trains to its end with its method's loss terms."""
    space = {
        "method.name": {"kind": "choice", "values": ["kd", "dkd", "fitnet", "at", "crd"]},
        "method.beta": {"kind": "logfloat", "low": 1, "high": 3000, "methods": ["fitnet", "at"]},
        "method.hint_stage": {"kind": "int", "low": -2, "high": -1, "methods": ["fitnet"]},
        "method.nce_k": {"kind": "int", "low": 64, "high": 16384, "methods": ["crd"]},
    }
    cfg = load_config(
        write_experiment(workdir, {"space": space}),
        [*SMALL, "train.epochs=1", "search.num_samples=6", "search.name=features", "search.scheduler.name=none"],
    )  # the five defaults, then one draw
    outcome = run_search(cfg, "unused")
    trials = runs_by_role(cfg.tracking.uri, cfg.tracking.experiment)["trial"]
    assert len(trials) == 6 and {run.info.status for run in trials} == {"FINISHED"}
    knobs = {"fitnet": {"method.beta", "method.hint_stage"}, "at": {"method.beta"}, "crd": {"method.nce_k"}}
    terms = {"kd": "loss/kd", "dkd": "loss/nckd", "fitnet": "loss/hint", "at": "loss/at", "crd": "loss/crd"}
    trained = 0
    for trial in trials:
        sampled = json.loads(trial.data.tags["kdray.sampled"])
        method = sampled["method.name"]
        assert set(sampled) == {"method.name", *knobs.get(method, set())}, sampled
        assert trial.data.metrics["val/acc"] > 0
        if trial.data.tags["kdray.reused"] == "false":  # a repeated draw (dkd has no knob here) reuses its student
            trained += 1
            assert terms[method] in trial.data.metrics, (method, sorted(trial.data.metrics))
    assert trained >= 5
    first = sorted(trials, key=lambda run: run.info.start_time)[:5]
    defaults = {json.loads(run.data.tags["kdray.sampled"])["method.name"]: run for run in first}
    assert set(defaults) == {"kd", "dkd", "fitnet", "at", "crd"}  # each method at its defaults first
    assert json.loads(defaults["at"].data.tags["kdray.sampled"])["method.beta"] == 1000.0
    assert json.loads(defaults["crd"].data.tags["kdray.sampled"])["method.nce_k"] == 16384
    assert outcome.report.best is not None


def readme_block(section: str, language: str) -> str:
    """The first ``language`` code block under the README heading ``section``, verbatim."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    after = text.split(section + "\n", 1)[1]
    return after.split(f"```{language}\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_chain_depths_share_their_assistants(
    local_ray: None, workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Depths 0, 1, 2 of a TAKD chain plane8 > ... > plane2: each distinct assistant is trained once. The search
    joins the session's Ray instance by address, as on a cluster: its shared teacher is then trained by a Ray
    task holding both slots' CPUs, not in the driver."""
    monkeypatch.setenv("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    cfg = load_config(
        write_experiment(workdir, {"space": {"assistants.depth": {"kind": "choice", "values": [0, 1, 2]}}}),
        [
            *SMALL,
            "teacher.name=plane8",
            "method.name=takd",
            "train.epochs=2",
            "search.num_samples=5",
            "search.name=chains",
            "search.scheduler.name=none",
            "search.sampler.name=random",
            "tracking.experiment=chains",
        ],
    )
    run_search(cfg, "unused")
    runs = runs_by_role(cfg.tracking.uri, "chains")
    depths = Counter(json.loads(run.data.tags["kdray.sampled"])["assistants.depth"] for run in runs["trial"])
    assert set(depths) == {0, 1, 2} and sum(depths.values()) == 5
    assistant_runs = [run for role, group in runs.items() if role.startswith("assistant") for run in group]
    trained = Counter(run.data.tags["kdray.model_key"] for run in assistant_runs)
    assert trained and set(trained.values()) == {1}  # every assistant trained exactly once
    (search,) = runs["search"]
    assert "training teacher plane8 with 2 CPUs in a Ray task before the trials start" in capsys.readouterr().out
    (teacher,) = runs["teacher"]
    assert teacher.data.tags["kdray.reused"] == "false" and teacher.data.tags["kdray.shared_guide"] == "true"
    assert teacher.data.tags["mlflow.parentRunId"] == search.info.run_id
    reused = sum(int(run.data.tags["kdray.models_reused"]) for run in runs["trial"])
    assert reused >= 5  # the teacher, for every trial
    # Trials run in their own folders, yet fill one guide-output cache, in the store: one table per guide.
    tables = list(workdir.glob("**/guide-outputs/*/meta.json"))
    assert {table.parent.parent for table in tables} == {(Path(cfg.store.path) / "guide-outputs").resolve()}
    guides = {json.loads(table.read_text())["guide"] for table in tables}
    assert len(guides) == len(tables) >= 2  # the teacher and at least one assistant


@pytest.mark.slow
def test_crashing_trial_is_retried_then_recorded_failed_with_its_reason(local_ray: None, workdir: Path) -> None:
    """A sampled batch larger than the training set passes the driver's checks (made on the base config) but
    fails in the trial: the trial is retried (search.max_failures=1), then its run and the teacher run it
    opened end FAILED with the reason. (The teacher is left to the trial: trained first, it would fail the
    search, as the next test shows.)"""
    space = {"train.batch_size": {"kind": "choice", "values": [4096]}}
    cfg = load_config(
        write_experiment(workdir, {"space": space}),
        [
            *SMALL,
            "search.guides_first=false",
            "search.num_samples=1",
            "search.max_failures=1",
            "search.name=crash",
            "tracking.experiment=crash",
        ],
    )
    run_search(cfg, "unused")
    client = MlflowClient(cfg.tracking.uri)
    runs = runs_by_role(cfg.tracking.uri, "crash")
    (trial,) = runs["trial"]  # the retry continued the same run
    assert client.get_run(trial.info.run_id).info.status == "FAILED"
    assert "train.batch_size=4096 is larger than the 1295 training images" in trial.data.tags["kdray.error"]
    teachers = runs["teacher"]
    assert len(teachers) == 2  # one per attempt: the first try and its retry
    assert {client.get_run(run.info.run_id).info.status for run in teachers} == {"FAILED"}
    (parent,) = runs["search"]
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


def test_a_shared_guide_that_fails_ends_the_search_before_any_trial(local_ray: None, workdir: Path) -> None:
    """Every trial needs the shared teacher: if it cannot be trained, no trial starts, and the search run and
    the teacher's run end FAILED with the reason."""
    cfg = load_config(
        write_experiment(workdir, {"space": {"method.temperature": {"kind": "float", "low": 1, "high": 8}}}),
        [*SMALL, "train.lr=1e6", "search.num_samples=2", "search.name=guide-fails", "tracking.experiment=gf"],
    )
    with pytest.raises(TrainingDiverged, match="^teacher: the loss became nan in epoch 1"):
        run_search(cfg, "unused")
    client = MlflowClient(cfg.tracking.uri)
    runs = runs_by_role(cfg.tracking.uri, "gf")
    assert set(runs) == {"search", "teacher"}  # no trial was started
    for (run,) in (runs["search"], runs["teacher"]):
        assert client.get_run(run.info.run_id).info.status == "FAILED"
        assert run.data.tags["kdray.error"].startswith("TrainingDiverged: teacher: the loss became nan")


def test_bad_search_space_is_refused_before_anything_starts(bare_workdir: Path) -> None:
    cfg = load_config(
        write_experiment(bare_workdir, {"space": {"method.temperature": {"kind": "float", "low": 0, "high": 4}}}),
        SMALL,
    )
    with pytest.raises(ConfigError, match=r"search.space.method.temperature: 0.0 is invalid for method kd"):
        run_search(cfg, "bad")
    assert not (bare_workdir / "mlflow.db").exists() and not (bare_workdir / ".kdray").exists()


def start_tune(*args: str, err: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``kdray tune ARGS`` in its own process group, as a user's terminal starts it; its stderr goes to ``err``."""
    return subprocess.Popen(
        [sys.executable, "-m", "kdray", "tune", *args],
        env={**os.environ, **(env or {})},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=err.open("w"),
    )


def wait_for(condition: Callable[[], bool], process: subprocess.Popen[bytes], err: Path, seconds: float = 300) -> None:
    """Poll ``condition`` until it holds; fail at once with the driver's stderr (``err``) if it ends first."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, err.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no progress: {err.read_text()[-3000:]}"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_search_killed_three_times_resumes_each_time_and_ends_with_one_run_per_trial(workdir: Path) -> None:
    """``kill -9`` of the driver at the three moments that leave different state, each followed by
    ``kdray tune --resume``; the last resume runs to the end. One search, so four driver starts, not six:

    1. after the search opened (its run, its folder) but before Tune saved a first state: the resume starts
       the trials afresh under the same name and MLflow run, instead of Ray's traceback;
    2. while the shared teacher trains, before the trials: its checkpoint is in the search's storage
       (absolute, decided on the driver), so the next resume continues it from its last epoch in a new run;
       the run the dead driver left RUNNING is closed KILLED with the reason, and every process of the dead
       driver's Ray instance exits while the next driver runs;
    3. at the third trial, Tune having saved its state once (a checkpoint period of a day, so only at its first
       step): the kill leaves a run of a trial Tune does not know; the restored searcher draws its values
       again under a new trial id, and that trial must take the run over, not open a second one.
    """
    file = write_experiment(workdir, {"space": {"method.temperature": {"kind": "float", "low": 1, "high": 8}}})
    overrides = [
        *SMALL,
        "teacher.epochs=40",
        "train.epochs=2",
        "train.batch_size=16",  # 0.3 s per teacher epoch: kill 2 lands mid-teacher, the teacher outlives it
        "search.num_samples=4",
        "search.name=killed",
        "search.scheduler.name=none",
        "tracking.experiment=killed",
    ]
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(uri)
    state = workdir / ".kdray" / "ray" / "killed"

    def runs() -> dict[str, list]:
        return runs_by_role(uri, "killed") if client.get_experiment_by_name("killed") else {}

    def teacher_epochs() -> int:
        teachers = runs().get("teacher", [])
        return max((m.step for r in teachers for m in client.get_metric_history(r.info.run_id, "val/acc")), default=0)

    # 1. before Tune saved
    first = start_tune(str(file), *overrides, err=workdir / "first.err")
    try:
        wait_for(lambda: (state / "kdray-search.json").exists(), first, workdir / "first.err", 120)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    for saved in state.glob("experiment_state-*.json"):  # if Tune got that far, the kill came a moment later
        saved.unlink()

    # 2. mid-teacher: the driver alone is killed, as `kill -9 PID` does
    second = start_tune("--resume", "killed", err=workdir / "second.err")
    third: subprocess.Popen[bytes] | None = None
    try:
        wait_for(lambda: teacher_epochs() >= 3, second, workdir / "second.err")
        started = process_tree(second.pid) - {second.pid}  # Ray's processes, Tune's trial, its workers
        second.kill()
        second.wait()
        # 3. at once, while the dead driver's processes wind down; Tune saves once, at its first step. Ray's
        # dashboard and runtime-env agents see their raylet die within seconds, then spend about a minute
        # failing to report it to the dead GCS before they exit
        third = start_tune("--resume", "killed", err=workdir / "third.err", env={"TUNE_GLOBAL_CHECKPOINT_S": "86400"})
        deadline = time.monotonic() + 300
        while (left := {pid for pid in started if alive(pid)}) or third.returncode is None:
            if third.returncode is None and len(runs().get("trial", [])) >= 3:
                os.killpg(third.pid, signal.SIGKILL)
                third.wait()
            assert third.poll() is None or third.returncode < 0, (workdir / "third.err").read_text()[-3000:]
            assert time.monotonic() < deadline, [Path(f"/proc/{pid}/cmdline").read_bytes()[:80] for pid in left]
            time.sleep(0.2)
        assert len(started) > 5
    finally:
        for process in (second, third):
            if process is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    before = {run.data.tags["kdray.trial_id"]: run for run in runs()["trial"]}
    known = restored_trial_ids(state)
    lost = set(before) - known
    assert len(known) == 2 and len(lost) >= 1  # 2 slots: the third trial is started after Tune's one save

    done = subprocess.run(
        [sys.executable, "-m", "kdray", "tune", "--resume", "killed"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # piped output reads as plain text: the live table continues, no escape codes (Ray colours its URL)
    assert "search killed: 4/4 trials ended" in done.stdout and "\x1b[" not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    after = runs()
    assert len(after["search"]) == 1 and after["search"][0].info.status == "FINISHED"
    trial_ids = [run.data.tags["kdray.trial_id"] for run in after["trial"]]
    assert len(trial_ids) == len(set(trial_ids)) == 4  # num_samples trials, one run each
    assert "unrecorded_trial" not in after  # every run Tune lost was taken over by the trial that drew its values
    assert {run.info.status for run in after["trial"]} == {"FINISHED"}
    by_run = {run.info.run_id: run for run in after["trial"]}
    for trial_id in lost:
        run = by_run[before[trial_id].info.run_id]
        assert run.data.tags["kdray.first_trial_id"] == trial_id and run.data.tags["kdray.trial_id"] not in before
        assert run.data.tags["kdray.sampled"] == before[trial_id].data.tags["kdray.sampled"]
        assert run.info.run_name.endswith(f"({run.data.tags['kdray.trial_id']})")
    for run in after["trial"]:
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/acc"))
        assert steps == [1, 2], (run.info.run_name, steps)  # resumed trials: no repeats, no gaps
    # the teacher: killed mid-way (closed KILLED with the reason), continued from its checkpoint in a new run,
    # trained once in all, ahead of the trials; no trial counts it trained (a trial run again after the
    # restore reports what it found and keeps its tags); nothing is left RUNNING
    teachers = sorted(after["teacher"], key=lambda run: run.info.start_time)
    killed, resumed = teachers[-2:]
    assert [run.info.status for run in teachers] == ["KILLED"] * (len(teachers) - 1) + ["FINISHED"]
    assert "interrupted" in killed.data.tags["kdray.error"]
    assert int(resumed.data.tags["kdray.resumed_from_epoch"]) >= 3
    assert resumed.data.tags["kdray.shared_guide"] == "true"
    assert sum(int(run.data.tags["kdray.models_trained"]) for run in after["trial"]) == 0
    assert not [run.info.run_name for group in after.values() for run in group if run.info.status == "RUNNING"]


def saved_trials(*trial_ids: str) -> list[list[str]]:
    """``trial_data`` of a saved Tune experiment state: per trial its JSON and its runtime JSON."""
    return [[json.dumps({"trial_id": trial_id}), json.dumps({"num_failures": 0})] for trial_id in trial_ids]


def test_a_searcher_count_ahead_of_the_saved_trials_is_realigned(tmp_path: Path) -> None:
    """A driver killed between Tune's upload of its trial list and of its searcher's count (a bucket's storage)
    leaves the count ahead: the resumed search would end short of num_samples. The count is set to the trials
    of the saved state, and ``finished`` with it; a consistent state is left alone."""
    import ray.cloudpickle as cloudpickle

    from kdray.search.unrecorded import align_searcher_with_trials

    session = "2026-12-07_02-13-17"
    (tmp_path / f"experiment_state-{session}.json").write_text(json.dumps({"trial_data": saved_trials("a1", "b2")}))
    counter = tmp_path / f"search_gen_state-{session}.json"
    counter.write_bytes(cloudpickle.dumps({"counter": 4, "total_samples": 4, "finished": True, "experiment": None}))
    realigned = align_searcher_with_trials(str(tmp_path))
    assert realigned is not None and (realigned.count_before, realigned.count_after, realigned.unseen) == (4, 2, ())
    state = cloudpickle.loads(counter.read_bytes())
    assert state["counter"] == 2 and state["finished"] is False and state["total_samples"] == 4
    assert align_searcher_with_trials(str(tmp_path)) is None  # agreeing now: nothing to change


def test_saved_trials_the_saved_searcher_never_saw_are_left_out_of_the_restored_search(tmp_path: Path) -> None:
    """The other way round (found by tests/test_object_storage.py): the trial list uploaded after a trial was
    created, the searcher's pickle before. Restored as is, the searcher meets a result of a trial it has no
    Optuna trial for and the resumed search dies (``KeyError`` in ``OptunaSearch.on_trial_result``). The unseen
    trial is dropped from the list and the count; the restored searcher then takes every result of the list."""
    import ray.cloudpickle as cloudpickle
    from ray.tune.search.optuna import OptunaSearch

    from kdray.search.unrecorded import align_searcher_with_trials

    session = "2026-12-07_15-20-00"
    searcher = OptunaSearch(space={"t": optuna.distributions.FloatDistribution(1, 8)}, metric="acc", mode="max")
    for trial_id in ("aaaa0001", "aaaa0002"):
        searcher.suggest(trial_id)
    searcher.save(str(tmp_path / f"searcher-state-{session}.pkl"))
    listed = ["aaaa0001", "aaaa0002", "aaaa0003"]  # the third created after the searcher was saved
    (tmp_path / f"experiment_state-{session}.json").write_text(
        json.dumps({"trial_data": saved_trials(*listed), "stats": {}})
    )
    counter = tmp_path / f"search_gen_state-{session}.json"
    counter.write_bytes(cloudpickle.dumps({"counter": 3, "total_samples": 4, "finished": False, "experiment": None}))

    realigned = align_searcher_with_trials(str(tmp_path))

    assert realigned is not None and realigned.unseen == ("aaaa0003",)
    assert (realigned.count_before, realigned.count_after) == (3, 2)
    saved = json.loads((tmp_path / f"experiment_state-{session}.json").read_text())
    assert [json.loads(entry[0])["trial_id"] for entry in saved["trial_data"]] == listed[:2]
    assert saved["stats"] == {}  # the rest of Tune's state is kept
    assert cloudpickle.loads(counter.read_bytes())["counter"] == 2
    restored = OptunaSearch(metric="acc", mode="max")
    restored.restore(str(tmp_path / f"searcher-state-{session}.pkl"))
    for entry in saved["trial_data"]:
        restored.on_trial_result(json.loads(entry[0])["trial_id"], {"acc": 0.5, "training_iteration": 1})
    with pytest.raises(KeyError):  # what the resumed search died of before
        restored.on_trial_result("aaaa0003", {"acc": 0.5, "training_iteration": 1})
    assert align_searcher_with_trials(str(tmp_path)) is None
