"""Kill the `kdray train` driver mid-training (a real SIGKILL), rerun the same command: it continues.

In process and on Ray Train, the rerun finds the unfinished MLflow run of the same name and config
and the stage's checkpoints under ``scaling.storage_path``; it resumes after the last checkpointed
epoch, in the same MLflow runs, with every epoch logged exactly once. In process, the resumed run trains
exactly what an uninterrupted one trains (CRD, whose memory bank of every sample lives in the checkpoint).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import Run

from kdray.tag_names import MODEL_KEY

pytestmark = pytest.mark.slow  # end to end: killed drivers and reruns

# Small batches make an epoch last 0.3-1 s (on an idle machine a Ray Train epoch takes 0.3 s): once epoch 3 is
# seen in MLflow, 17 epochs are left, 5 s or more, time enough for the kill to land mid-run. With 8 epochs an
# idle machine finished and stored the model before the kill landed, and the rerun reused it.
EPOCHS = 20
OVERRIDES = [
    "method.name=none",
    "student.name=resnet8",
    f"train.epochs={EPOCHS}",
    "train.batch_size=16",
    "scaling.threads=1",
    "scaling.use_gpu=false",
    "tracking.experiment=resume",
    "tracking.run_name=interrupted",
]


def logged_epochs(uri: str) -> int:
    """The highest epoch any student run of the experiment has logged (0 before the first)."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("resume")
    if experiment is None:
        return 0
    runs = client.search_runs([experiment.experiment_id], "tags.`kdray.role` = 'student'")
    return max((m.step for run in runs for m in client.get_metric_history(run.info.run_id, "val/acc")), default=0)


def run_until_killed(command: list[str], uri: str, after_epoch: int) -> None:
    """Start the command in its own process group; SIGKILL the whole group once ``after_epoch`` is logged."""
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while logged_epochs(uri) < after_epoch:
            if process.poll() is not None:
                raise AssertionError(f"finished before it could be killed: {process.stderr.read().decode()[-2000:]}")
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def student_run(client: MlflowClient) -> Run:
    (student,) = client.search_runs(
        [client.get_experiment_by_name("resume").experiment_id], "tags.`kdray.role` = 'student'"
    )
    return student


def assert_continued(client: MlflowClient, killed: Run, runs: int) -> None:
    """The rerun closed every run, opened none beside the ``runs`` of one uninterrupted command, and continued
    the killed student run (not from scratch), each epoch logged once."""
    every = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert len(every) == runs and {run.info.status for run in every} == {"FINISHED"}  # continued, not duplicated
    student = client.get_run(killed.info.run_id)
    assert int(student.data.tags["kdray.resumed_from_epoch"]) >= 2  # not from scratch
    for metric in ("val/acc", "loss/total"):
        steps = sorted(m.step for m in client.get_metric_history(student.info.run_id, metric))
        assert steps == list(range(1, EPOCHS + 1)), (metric, steps)
    assert "test/acc" in student.data.metrics


def test_rerun_after_driver_kill_resumes_on_ray_train_from_the_last_checkpoint(workdir: Path) -> None:
    (workdir / "experiment.yaml").write_text("data: {name: digits}\n")
    command = [sys.executable, "-m", "kdray", "train", "experiment.yaml", *OVERRIDES, "scaling.num_workers=1"]
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    run_until_killed(command, uri, after_epoch=3)
    client = MlflowClient(uri)
    killed = student_run(client)
    assert killed.info.status == "RUNNING"  # the driver died without closing it
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_continued(client, killed, runs=2)  # the parent and the student


def test_crd_resumed_in_process_after_a_kill_trains_exactly_what_an_uninterrupted_run_trains(workdir: Path) -> None:
    """CRD's memory bank and Z live in the checkpoint: the killed and resumed run stores the very weights of a
    run never interrupted (the bank of every sample feeds every later step; a bank reset or lost at the resume
    would change them). The in-process driver's rerun continues its MLflow runs as on Ray Train."""
    (workdir / "experiment.yaml").write_text("data: {name: digits}\n")
    crd = [*OVERRIDES, "method.name=crd", "method.nce_k=256", "teacher.name=plane4", "teacher.epochs=2",
           "student.name=plane2", "tracking.run_name=crd"]  # fmt: skip
    stored = {}
    for name, interrupted in (("killed", True), ("uninterrupted", False)):
        folder = workdir / name
        paths = [f"store.path={folder}/store", f"scaling.storage_path={folder}/ray",
                 f"tracking.uri=sqlite:///{folder}/mlflow.db"]  # fmt: skip
        folder.mkdir()
        shutil.copy(workdir / "mlflow.db", folder / "mlflow.db")
        command = [sys.executable, "-m", "kdray", "train", "experiment.yaml", *crd, *paths]
        client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
        if interrupted:
            run_until_killed(command, f"sqlite:///{folder}/mlflow.db", after_epoch=3)
            killed = student_run(client)
            assert killed.info.status == "RUNNING"  # the driver died without closing it
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        if interrupted:
            assert_continued(client, killed, runs=3)  # the parent, the teacher and the student
        key = student_run(client).data.tags[MODEL_KEY]
        stored[name] = torch.load(folder / "store" / key / "model.pt", weights_only=True)
    assert stored["killed"].keys() == stored["uninterrupted"].keys()
    for name, tensor in stored["uninterrupted"].items():
        assert torch.equal(stored["killed"][name], tensor), name
