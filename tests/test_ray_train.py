"""Ray Train for real: a local Ray cluster, two gloo workers, DDP, MLflow from rank 0."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from mlflow import MlflowClient

from kdray.config import load_config
from kdray.run import run_experiment
from kdray.store import ModelStore


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_two_gloo_workers_train_a_kd_run_on_digits(local_ray: None, workdir: Path) -> None:
    cfg = load_config(
        None,
        [
            "teacher.name=plane4",
            "teacher.epochs=1",
            "student.name=plane2",
            "train.epochs=2",
            "train.batch_size=32",
            "scaling.num_workers=2",
            "scaling.use_gpu=false",
            "scaling.threads=1",
            "tracking.experiment=ray",
        ],
    )
    result = run_experiment(cfg)
    client = MlflowClient(cfg.tracking.uri)
    for stage in result.stages:
        run = client.get_run(stage.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["world_size"] == "2"  # logged by the chief worker itself
        assert [m.step for m in client.get_metric_history(stage.run_id, "val/acc")] == list(
            range(1, stage.plan.train.epochs + 1)
        )
        assert ModelStore(cfg.store.path).find(stage.plan.key) is not None
    assert set(client.get_run(result.student.run_id).data.metrics) >= {"loss/ce", "loss/kd", "test/acc"}
