"""Ray's run storage and kdray's search state on object storage: ``scaling.storage_path=s3://…`` against a real
S3-protocol server on loopback (moto, the ``s3_server`` fixture), reached through the usual AWS variables.

A search whose driver is killed with SIGKILL continues with ``kdray tune --resume NAME --storage s3://…`` from
what the bucket holds alone: the same search run, no finished trial trained again, the shared teacher not
trained again, every trial with one run and every epoch logged once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.servers import S3Server

pytestmark = pytest.mark.slow  # an S3 server, a search killed and resumed

OVERRIDES = [
    "teacher.name=plane4", "teacher.epochs=2", "student.name=plane2", "scaling.threads=1", "search.references=false",
    "search.scheduler.name=none", "train.epochs=3", "train.batch_size=32", "search.num_samples=4",
    "search.max_concurrent_trials=2", "tracking.experiment=bucket",
]  # fmt: skip


def runs(uri: str, role: str) -> list:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name("bucket")
    if found is None:
        return []
    return [r for r in client.search_runs([found.experiment_id]) if r.data.tags.get("kdray.role") == role]


def test_a_killed_search_resumes_from_object_storage(workdir: Path, s3_server: S3Server) -> None:
    storage = f"s3://{s3_server.bucket}/runs"
    (workdir / "search.yaml").write_text(
        json.dumps({"search": {"space": {"method.temperature": {"kind": "float", "low": 1, "high": 8}}}})
    )
    env = {**os.environ, **s3_server.env}
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    command = [sys.executable, "-m", "kdray", "tune", "search.yaml", *OVERRIDES, f"scaling.storage_path={storage}",
               "search.name=bucketed"]  # fmt: skip
    process = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 400
    try:  # kill once two trials are done and Tune has saved its state in the bucket
        while not (
            sum(run.info.status == "FINISHED" for run in runs(uri, "trial")) >= 2
            and any("experiment_state" in key for key in s3_server.keys("runs/bucketed/"))
        ):
            assert process.poll() is None, process.stderr.read().decode()[-3000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.5)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    finished = {run.info.run_id: run.info.end_time for run in runs(uri, "trial") if run.info.status == "FINISHED"}
    assert len(finished) >= 2
    assert "runs/bucketed/kdray-search.json" in s3_server.keys("runs/bucketed/")
    assert not (workdir / ".kdray" / "ray").exists()  # nothing of the search on the local disk

    done = subprocess.run(
        [sys.executable, "-m", "kdray", "tune", "--resume", "bucketed", "--storage", storage],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(uri)
    (search,) = runs(uri, "search")
    assert client.get_run(search.info.run_id).info.status == "FINISHED"
    trials = runs(uri, "trial")
    everything = [(r.data.tags.get("kdray.role"), r.data.tags.get("kdray.trial_id"), r.info.status,
                   r.data.tags.get("kdray.unrecorded")) for r in client.search_runs(
                       [client.get_experiment_by_name("bucket").experiment_id])]  # fmt: skip
    assert len(trials) == 4 and {run.info.status for run in trials} == {"FINISHED"}, (everything, done.stdout[-2000:])
    assert len({run.data.tags["kdray.trial_id"] for run in trials}) == 4
    for run in trials:
        if run.info.run_id in finished:  # finished before the kill: not trained again
            assert run.info.end_time == finished[run.info.run_id]
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/acc"))
        assert steps == [1, 2, 3], (run.info.run_name, steps)
    teachers = runs(uri, "teacher")
    assert sum(run.data.tags.get("kdray.reused") == "false" for run in teachers) == 1  # trained once, before the kill
