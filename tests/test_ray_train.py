"""Ray Train for real: a local Ray cluster, two gloo workers, DDP, MLflow from rank 0."""

from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from ray.util.state import list_actors

from kdray.engine import TrainingDiverged
from kdray.models import ModelInfo, build_model
from kdray.resolve import load_config
from kdray.run import run_experiment
from kdray.schema import ConfigError, ExperimentConfig
from kdray.store import ModelStore
from tests.conftest import TWO_CPU_WORKERS
from tests.faults import install_worker_fault
from tests.servers import MlflowServer


@pytest.fixture(scope="module")
def feature_teacher_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model store for this module's feature-method runs: the first (the worker-failure test) trains their
    (identical) teacher on the two workers, the others read it back and start only their student's worker group."""
    return tmp_path_factory.mktemp("feature-teacher-store")


def two_worker_feature_run(method: str, store: Path, *overrides: str) -> list[str]:
    """A plane4 teacher (1 epoch) and a plane2 student distilled by ``method`` on two gloo workers."""
    return [*TWO_CPU_WORKERS, f"method.name={method}", "teacher.name=plane4", "teacher.epochs=1",
            "student.name=plane2", f"store.path={store}", *(["method.nce_k=256"] if method == "crd" else []),
            *overrides]  # fmt: skip


def assert_student_alone_stored(cfg: ExperimentConfig, key: str) -> None:
    """The stored student is the student alone: no connector, memory bank or embedding head of its method."""
    stored = ModelStore(cfg.store.path).load(key, ModelInfo(10, 1, 8))
    assert not any(name.startswith(("regressor", "memory", "embed")) for name in stored.state_dict())


@pytest.mark.slow
def test_two_gloo_workers_train_fitnet_through_a_worker_failure_logging_to_the_tracking_server(
    local_ray: None, workdir: Path, feature_teacher_store: Path, tracking_server: MlflowServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Teacher and student each on two gloo workers, logging from rank 0 to the cluster's tracking server (an
    `mlflow server` on PostgreSQL); a worker of the student's group dies after epoch 3 and Ray Train restarts the
    group from the last checkpoint (scaling.max_failures), in the same MLflow run. FitNets' regressor, a
    connector that trains with the student but is not stored with it, comes back from the checkpoint too."""
    marker = workdir / "fault-fired"
    install_worker_fault(monkeypatch, epoch=3, marker=marker)  # the 1-epoch teacher never reaches it
    experiment = "ray-worker-failure"
    cfg = load_config(
        None,
        two_worker_feature_run(
            "fitnet", feature_teacher_store, "train.epochs=4", "scaling.max_failures=1",
            f"tracking.uri={tracking_server.uri}", f"tracking.experiment={experiment}",
        ),
    )  # fmt: skip
    result = run_experiment(cfg)
    assert marker.exists()  # the wrapper really killed a worker after epoch 3
    client = MlflowClient(tracking_server.uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 3  # the parent, the teacher and one student run: the restart continued the same run
    for stage in result.stages:
        run = client.get_run(stage.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["world_size"] == "2"  # logged by the chief worker itself
        for metric in ("val/acc", "loss/total"):  # no epoch repeated or lost across the restart
            steps = sorted(m.step for m in client.get_metric_history(stage.run_id, metric))
            assert steps == list(range(1, stage.plan.train.epochs + 1)), (stage.plan.role, metric, steps)
        assert ModelStore(cfg.store.path).find(stage.plan.key) is not None
    student = client.get_run(result.student.run_id)
    # Restored from a checkpoint, not from scratch. The kill follows epoch 3's report at once, so the
    # controller may not have registered that one yet: the latest is epoch 3's or an earlier one.
    assert 1 <= int(student.data.tags["kdray.resumed_from_epoch"]) <= 3
    assert set(student.data.metrics) >= {"loss/ce", "loss/hint", "test/acc"}
    # Checkpoints after epochs 1-3 (the last epoch stores the model instead), and again after the restart:
    # Ray keeps the newest 2. The killed attempt's last checkpoint can be left beside them, written but never
    # registered (the worker died right after reporting it); without pruning there would be 4 or more.
    stage = Path(cfg.scaling.storage_path) / f"stage-{result.student.plan.key}"
    kept = [path for path in stage.glob("checkpoint_*") if path.is_dir()]
    assert cfg.scaling.keep_checkpoints == 2 and 2 <= len(kept) <= 3
    assert result.student.metrics["val/acc"] == student.data.metrics["val/acc"]  # the stored model's own numbers
    assert_student_alone_stored(cfg, result.student.plan.key)


@pytest.mark.integration
def test_two_workers_reach_the_parameters_of_one_worker_with_the_same_global_batch(
    local_ray: None, workdir: Path
) -> None:
    """Without BatchNorm and augmentation, DDP over 2 x 16 images is SGD over 32: the same updates.

    The two compute the same sums in another order, so each step's gradients differ by a few float32
    epsilons. Over many steps SGD amplifies such noise without bound (40 steps of this run: weights
    0.024 apart at lr 0.05, while lr 0.04999999 vs 0.05000001 agree to 1e-6), so the test takes three
    steps, where it cannot grow: every weight's update must match to 1000 float32 epsilons of its size.
    """
    common = [
        "method.name=none",
        "student.name=plane4",
        "student.batchnorm=false",
        "train.epochs=1",
        "train.schedule=constant",
        "data.limit_train=96",  # 3 steps of 32 images
        "data.augment.padding=0",
        "data.augment.flip=false",
        "scaling.use_gpu=false",
        "scaling.threads=1",
        "tracking.experiment=equivalence",
    ]
    one = run_experiment(load_config(None, [*common, "train.batch_size=32", "store.path=one"]))
    two = run_experiment(load_config(None, [*common, "train.batch_size=16", "scaling.num_workers=2", "store.path=two"]))
    info = ModelInfo(num_classes=10, in_channels=1, image_size=8, batchnorm=False)
    alone = ModelStore("one").load(one.student.plan.key, info).state_dict()
    parallel = ModelStore("two").load(two.student.plan.key, info).state_dict()
    torch.manual_seed(0)  # train.seed: the initial weights of both runs
    initial = build_model("plane4", info).state_dict()
    tolerance = 1000 * torch.finfo(torch.float32).eps
    for name, tensor in alone.items():
        update = (tensor - initial[name]).abs().max()
        assert update > 1e-3, name  # training really moved every tensor
        assert (tensor - parallel[name]).abs().max() <= tolerance * update, name


def test_sync_batchnorm_is_refused_on_a_cluster_without_gpus(local_ray: None, workdir: Path) -> None:
    cfg = load_config(None, ["scaling.num_workers=1", "scaling.sync_batchnorm=true", "method.name=none"])
    with pytest.raises(ConfigError, match="scaling.sync_batchnorm: the Ray cluster has no GPUs"):
        run_experiment(cfg)
    assert not Path(cfg.scaling.storage_path).exists()  # refused before any Train run started


@pytest.mark.slow
def test_a_diverged_loss_on_the_workers_is_not_retried(local_ray: None, workdir: Path) -> None:
    """The same seed from the same checkpoint diverges again: with retries allowed (scaling.max_failures=2) the
    run ends at the first divergence with the workers' own error. Retried, it would end in Ray's
    WorkerGroupError once the retries ran out; the controller-side stop is what brings TrainingDiverged back."""
    cfg = load_config(
        None,
        [*TWO_CPU_WORKERS, "teacher.name=plane4", "teacher.epochs=3", "train.lr=1e6", "scaling.max_failures=2"]
        + ["tracking.experiment=diverged"],
    )
    with pytest.raises(TrainingDiverged, match=r"^teacher: the loss became nan in epoch 1; lower train.lr$"):
        run_experiment(cfg)
    client = MlflowClient(cfg.tracking.uri)
    (teacher,) = client.search_runs(
        [client.get_experiment_by_name("diverged").experiment_id], "tags.`kdray.role` = 'teacher'"
    )
    assert teacher.info.status == "FAILED" and teacher.data.tags["kdray.error"].startswith("TrainingDiverged: teacher")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["at", "crd"])  # fitnet: in the worker-failure test
def test_feature_methods_train_on_two_gloo_workers(
    local_ray: None, workdir: Path, feature_teacher_store: Path, method: str
) -> None:
    """A feature baseline under DDP: the student's connectors (CRD's embedding heads and memory bank) train on
    both workers, the teacher's features are read on each, and the stored student is the student alone."""
    cfg = load_config(
        None,
        two_worker_feature_run(method, feature_teacher_store, "train.epochs=1", "tracking.experiment=ray-features"),
    )
    result = run_experiment(cfg)
    student = MlflowClient(cfg.tracking.uri).get_run(result.student.run_id)
    assert student.data.params["world_size"] == "2"
    assert {"loss/ce", {"at": "loss/at", "crd": "loss/crd"}[method]} <= set(student.data.metrics)
    assert_student_alone_stored(cfg, result.student.plan.key)
    # kdray's job turns off Ray's PreemptionWatcher, one more actor process per worker group that kdray never reads
    assert not list_actors(filters=[("class_name", "=", "PreemptionWatcher")], detail=True)
