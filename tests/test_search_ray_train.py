"""`kdray tune` whose trials each train on a Ray Train worker group (``scaling.num_workers=1``).

The session's cluster has two CPUs and trials run one at a time, each on a worker group of one CPU:
a trial stopped by ASHA must give its placement group back (Ray Train's cleaner does it through the
State API), or its CPU stays taken — the search would hang once two are lost (an alarm turns that into
a failure), and at the end fewer CPUs than the cluster's would be free.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import ray
from mlflow import MlflowClient
from test_search import SMALL, runs_by_role, write_experiment

from kdray.resolve import load_config
from kdray.run import run_experiment
from kdray.search.driver import run_search

HANG_LIMIT_S = 600


pytestmark = pytest.mark.slow


def _hang(signum: int, frame: object) -> None:
    raise TimeoutError(f"the search made no progress for {HANG_LIMIT_S} s: a worker group is waiting for CPUs")


def test_trials_on_ray_train_free_their_workers_when_asha_stops_them(local_ray: None, workdir: Path) -> None:
    # The first trial runs the file's lr (0.05, the top of the range); the seeded sampler's next draw is far
    # lower and learns visibly less by the first rung, so ASHA stops it whatever the noise of these tiny runs.
    space = {"train.lr": {"kind": "logfloat", "low": 1e-5, "high": 0.05}}
    # The teacher keeps its own lr, so all trials share it; a 1-worker teacher is the in-process one (same
    # store key), trained here first so that the trials' worker groups train students only.
    teacher = ["teacher.lr=0.05", "scaling.num_workers=0", "train.epochs=1", "tracking.experiment=warm-up"]
    run_experiment(load_config(None, [*SMALL, *teacher]))
    cfg = load_config(
        write_experiment(workdir, {"space": space}),
        [
            *SMALL,
            "teacher.lr=0.05",
            "scaling.num_workers=1",
            "train.epochs=3",
            "search.num_samples=2",
            "search.max_concurrent_trials=1",
            "search.metric=val/loss",
            "search.mode=min",
            "search.scheduler.grace_period=1",
            "search.name=on-train",
            "tracking.experiment=on-train",
        ],
    )
    previous = signal.signal(signal.SIGALRM, _hang)
    signal.alarm(HANG_LIMIT_S)
    try:
        outcome = run_search(cfg, "unused")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    client = MlflowClient(cfg.tracking.uri)
    trials = runs_by_role(cfg.tracking.uri, "on-train")["trial"]
    statuses = {client.get_run(run.info.run_id).info.status for run in trials}
    errors = [run.data.tags.get("kdray.error") for run in trials if run.data.tags.get("kdray.error")]
    stopped = [run for run in trials if "stopped by ASHA" in run.data.tags.get("kdray.stopped", "")]
    # ASHA's stop reaches a Ray Train trial as an error from its TorchTrainer: still a stop, not a failure
    assert len(trials) == 2 and statuses == {"FINISHED"} and len(stopped) == 1, (statuses, errors)
    # every trial trained on a Ray Train worker group of one
    for run in trials:
        assert run.data.params["world_size"] == "1"
        assert run.data.tags["kdray.models_reused"] == "1"  # the teacher trained before the search
    assert outcome.report.counts["trials"] == 2
    # nothing is left holding the CPU once the search is over
    deadline = time.monotonic() + 60
    cpus = ray.cluster_resources()["CPU"]
    while ray.available_resources().get("CPU", 0) < cpus and time.monotonic() < deadline:
        time.sleep(1)
    assert ray.available_resources().get("CPU", 0) == cpus
