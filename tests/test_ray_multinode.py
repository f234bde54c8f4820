"""Several Ray nodes on one machine (ray.cluster_utils.Cluster): workers spread over nodes, and a search whose
nodes share no folder, only an S3 bucket and a tracking server (each node its own HOME and cache)."""

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from mlflow import MlflowClient
from ray.cluster_utils import Cluster

from kdray.resolve import load_config
from kdray.run import run_experiment
from kdray.search.driver import run_search
from kdray.store.objects import Bucket
from tests.conftest import TWO_CPU_WORKERS
from tests.servers import MlflowServer, S3Server

pytestmark = pytest.mark.slow  # end to end: a three-node Ray cluster


@pytest.fixture(scope="module")
def node_homes(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Each worker node's own HOME (its default cache folder, so its model-store mirror, is under it)."""
    return [tmp_path_factory.mktemp(f"node{index}-home") for index in range(2)]


@pytest.fixture(scope="module")
def three_nodes(node_homes: list[Path], s3_server: S3Server) -> Iterator[Cluster]:
    """A head without CPUs and two 1-CPU worker nodes, each with its own HOME and, as a cluster's nodes are
    configured (docs/cluster.md), the AWS variables of the bucket: kdray ships no credentials to the nodes."""
    ray.shutdown()  # the session's local instance, if a test started it (the next one that needs it restarts it)
    # A local ray.init() earlier in the session turned Ray's token authentication on (RAY_AUTH_MODE=token in this
    # process) and wrote the token to ~/.ray/auth_token: a raylet with another HOME is pointed at that file.
    token = {"RAY_AUTH_TOKEN_PATH": str(Path.home() / ".ray" / "auth_token")}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for home in node_homes:  # the raylet's environment, which its workers inherit
            node_env = {**s3_server.env, **token, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")}
            cluster.add_node(num_cpus=1, env_vars=node_env)
        ray.init(address=cluster.address, log_to_driver=False)
    except BaseException:
        cluster.shutdown()  # never leave a half-started cluster to the session's later Ray tests
        raise
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


def test_a_search_on_nodes_sharing_only_a_bucket_and_a_tracking_server(
    three_nodes: Cluster,
    node_homes: list[Path],
    workdir: Path,
    s3_server: S3Server,
    tracking_server: MlflowServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Run storage and the model store in the bucket, runs on the tracking server: two trials at a time, one on
    each 1-CPU node; the shared teacher is trained once (by the driver, before the trials) and each node loads
    it from the bucket into its own mirror; nothing of the store or of Ray's storage is on the driver's disk."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    bucket = f"s3://{s3_server.bucket}/multinode"
    (workdir / "search.yaml").write_text(
        json.dumps({"search": {"space": {"method.temperature": {"kind": "logfloat", "low": 1, "high": 8}}}})
    )
    experiment = "multinode-bucket"
    cfg = load_config(
        workdir / "search.yaml",
        ["teacher.name=plane4", "teacher.epochs=2", "student.name=plane2", "scaling.threads=1", "train.epochs=2",
         "train.batch_size=32", "search.references=false", "search.scheduler.name=none", "search.num_samples=4",
         "search.max_concurrent_trials=2", "search.resources_per_trial={CPU: 1}", f"store.path={bucket}/store",
         f"scaling.storage_path={bucket}/runs", f"tracking.uri={tracking_server.uri}",
         f"tracking.experiment={experiment}"],
    )  # fmt: skip
    run_search(cfg, "on-nodes")
    client = MlflowClient(tracking_server.uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)
    trials = [run for run in runs if run.data.tags.get("kdray.role") == "trial"]
    assert len(trials) == 4 and {run.info.status for run in trials} == {"FINISHED"}
    teachers = [run for run in runs if run.data.tags.get("kdray.role") == "teacher"]
    assert [run.data.tags["kdray.reused"] for run in teachers] == ["false"]  # trained once, by the driver
    (teacher_key,) = {run.data.tags["kdray.model_key"] for run in teachers}
    for home in node_homes:  # each node read the teacher from the bucket into a folder of its own
        assert list((home / ".cache" / "kdray" / "store-mirrors").glob(f"*/{teacher_key}/model.pt")), home
    assert teacher_key in Bucket(f"{bucket}/store").folders()
    assert not (workdir / ".kdray").exists()  # no local store, no local Ray storage
