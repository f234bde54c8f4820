"""The cluster's tracking path for real: a search logging to an `mlflow server` whose backend store is
PostgreSQL (both started on loopback by the ``tracking_server`` fixture), as on a cluster head. A two-worker Ray
Train run logging to it: tests/test_ray_train.py's worker-failure test.

Counted from the server afterwards, as a user reviewing the search would: every epoch of every trial exactly
once, with four trials writing at once and the server gone for 30 s in the middle of their search.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from kdray.data import load_dataset
from kdray.resolve import load_config
from kdray.tag_names import REGISTERED_MODEL
from tests.servers import MlflowServer

pytestmark = pytest.mark.slow  # a PostgreSQL cluster and an MLflow server, then searches against them

SMALL = [
    "teacher.name=plane4", "teacher.epochs=2", "student.name=plane2", "scaling.threads=1", "search.references=false",
    "search.scheduler.name=none",
]  # fmt: skip


def trial_runs(client: MlflowClient, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    assert found is not None, experiment
    runs = client.search_runs([found.experiment_id], max_results=1000)
    return [run for run in runs if run.data.tags.get("kdray.role") == "trial"]


def assert_every_epoch_logged_once(client: MlflowClient, trials: list, epochs: int) -> None:
    """Each trial's per-epoch metrics hold the steps 1..epochs, each exactly once: nothing lost, nothing twice."""
    for trial in trials:
        for metric in ("val/acc", "loss/total", "lr"):
            steps = sorted(m.step for m in client.get_metric_history(trial.info.run_id, metric))
            assert steps == list(range(1, epochs + 1)), (trial.info.run_name, metric, steps)


def test_four_concurrent_trials_ride_out_the_server_gone_for_30_seconds(
    workdir: Path, tracking_server: MlflowServer
) -> None:
    """Four trials write at once; the server stops mid-search and comes back 30 s later on the same address: the
    trials wait in MLflow's own retries (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, 7 with doubling back-off: about 4
    minutes in all), then every metric arrives, once, and the registered student loads from the server. A longer
    outage fails the trial with MLflow's error, and the search resumes (`kdray tune --resume`,
    docs/reliability.md)."""
    experiment, epochs = "server-outage", 6
    (workdir / "search.yaml").write_text(
        json.dumps({"search": {"space": {"method.temperature": {"kind": "logfloat", "low": 1, "high": 8}}}})
    )
    overrides = [
        *SMALL, f"tracking.uri={tracking_server.uri}", f"tracking.experiment={experiment}", f"train.epochs={epochs}",
        "train.batch_size=16", "search.num_samples=4", "search.max_concurrent_trials=4",
        "search.resources_per_trial={CPU: 0.5}", "search.name=outage",
    ]  # fmt: skip
    command = [sys.executable, "-m", "kdray", "tune", "search.yaml", *overrides]
    search = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    client = MlflowClient(tracking_server.uri)
    try:
        deadline = time.monotonic() + 300
        while not any(
            client.get_metric_history(run.info.run_id, "val/acc") for run in _trials_if_any(client, experiment)
        ):
            assert search.poll() is None, search.stderr.read()[-3000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no trial logged an epoch"
            time.sleep(0.5)
        tracking_server.stop()
        gone = time.monotonic()
        time.sleep(30)
        assert search.poll() is None, "the search ended while the server was away"
        tracking_server.start()
        away = time.monotonic() - gone
        _, errors = search.communicate(timeout=600)
    finally:
        if search.poll() is None:
            search.kill()
        if tracking_server.process is None:
            tracking_server.start()  # the session's other tests need it
    assert search.returncode == 0, errors[-3000:]
    assert away >= 30
    trials = trial_runs(client, experiment)
    assert len(trials) == 4 and {run.info.status for run in trials} == {"FINISHED"}
    assert not any("kdray.resumed_from_epoch" in run.data.tags for run in trials)  # waited, never restarted
    assert_every_epoch_logged_once(client, trials, epochs)
    starts = sorted(run.info.start_time for run in trials)
    ends = sorted(run.info.end_time for run in trials)
    assert starts[-1] < ends[0], "the four trials ran at once"
    # the registered student loads from the server (its weights through MLflow's artifact proxy) and scores
    # the logged test accuracy
    (parent,) = [
        run
        for run in client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        if run.data.tags.get("kdray.role") == "search"
    ]
    registered = parent.data.tags[REGISTERED_MODEL]
    mlflow.set_tracking_uri(tracking_server.uri)
    try:
        student = mlflow.pytorch.load_model(registered)
    finally:
        mlflow.set_tracking_uri(None)
    test = load_dataset(load_config(workdir / "search.yaml", overrides).data).test
    accuracy = (student(test.images.float() / 255).argmax(1) == test.labels).float().mean().item()
    version = client.get_model_version(*registered.removeprefix("models:/").split("/"))
    assert accuracy == pytest.approx(client.get_run(version.run_id).data.metrics["test/acc"])


def _trials_if_any(client: MlflowClient, experiment: str) -> list:
    return trial_runs(client, experiment) if client.get_experiment_by_name(experiment) is not None else []
