"""Several Ray nodes on one machine (ray.cluster_utils.Cluster): workers spread over nodes."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from mlflow import MlflowClient
from ray.cluster_utils import Cluster

from kdray.resolve import load_config
from kdray.run import run_experiment
from tests.conftest import TWO_CPU_WORKERS

pytestmark = pytest.mark.slow  # end to end: a three-node Ray cluster


@pytest.fixture(scope="module")
def three_nodes() -> Iterator[Cluster]:
    ray.shutdown()  # the session's local instance, if a test started it (the next one that needs it restarts it)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_spread_workers_run_on_two_nodes(three_nodes: Cluster, workdir: Path) -> None:
    cfg = load_config(
        None,
        [
            *TWO_CPU_WORKERS,
            "method.name=none",
            "student.name=plane2",
            "train.epochs=1",
            "scaling.placement_strategy=SPREAD",
            "tracking.experiment=multinode",
        ],
    )
    result = run_experiment(cfg)
    run = MlflowClient(cfg.tracking.uri).get_run(result.student.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "2"
    assert run.data.params["worker_nodes"] == "2"  # one worker on each 1-CPU node
