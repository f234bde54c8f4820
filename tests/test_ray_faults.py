"""A worker process dies mid-training; Ray Train restarts the group from the last checkpoint."""

from pathlib import Path

import pytest
from mlflow import MlflowClient

from kdray.config import load_config
from kdray.run import run_experiment
from tests.conftest import TWO_CPU_WORKERS
from tests.faults import install_worker_fault

pytestmark = pytest.mark.slow


def test_killed_worker_resumes_from_checkpoint_without_repeating_metrics(
    local_ray: None, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = workdir / "fault-fired"
    install_worker_fault(monkeypatch, epoch=3, marker=marker)
    cfg = load_config(
        None,
        [
            *TWO_CPU_WORKERS,
            "method.name=none",
            "student.name=plane2",
            "train.epochs=5",
            "scaling.max_failures=1",
            "tracking.experiment=faults",
        ],
    )
    result = run_experiment(cfg)
    assert marker.exists()  # the wrapper really killed a worker after epoch 3
    client = MlflowClient(cfg.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    assert len(runs) == 2  # the parent and one student run: the restart continued the same run
    student = client.get_run(result.student.run_id)
    assert student.info.status == "FINISHED"
    # Restored from a checkpoint, not from scratch. The kill follows epoch 3's report at once, so the
    # controller may not have registered that one yet: the latest is epoch 3's or an earlier one.
    assert 1 <= int(student.data.tags["kdray.resumed_from_epoch"]) <= 3
    for metric in ("val/acc", "loss/total"):
        assert sorted(m.step for m in client.get_metric_history(student.info.run_id, metric)) == [1, 2, 3, 4, 5]
    assert result.student.metrics["val/acc"] == student.data.metrics["val/acc"]  # the stored model's own numbers
