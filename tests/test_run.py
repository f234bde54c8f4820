"""End to end: `kdray train` against a real sqlite MLflow store, read back through MlflowClient."""

import logging
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from kdray.engine import TrainingDiverged
from kdray.resolve import load_config
from kdray.run import run_experiment
from kdray.schema import ConfigError
from kdray.store import ModelStore
from tests.faults import zero_in_place

QUICK = [
    "teacher.name=plane4",
    "teacher.epochs=2",
    "student.name=plane2",
    "train.epochs=2",
    "train.batch_size=64",
    "tracking.experiment=test",
]


def _runs(uri: str, experiment: str = "test") -> list:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.mark.integration
def test_parent_and_stage_runs_with_metrics_and_teacher_reuse(workdir: Path) -> None:
    cfg = load_config(None, QUICK)
    assert cfg.tracking.uri == f"sqlite:///{workdir}/mlflow.db"  # made absolute: workers have other folders
    first = run_experiment(cfg)
    client = MlflowClient(cfg.tracking.uri)
    parent = client.get_run(first.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["method.temperature"] == "4.0" and parent.data.params["student.name"] == "plane2"
    assert parent.data.tags["method"] == "kd" and parent.data.tags["kdray.version"]
    assert "config.yaml" in [a.path for a in client.list_artifacts(first.parent_run_id)]
    children = {
        r.info.run_name: r
        for r in _runs(cfg.tracking.uri)
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(children) == {"teacher", "student"}
    for role, run in children.items():
        assert run.info.status == "FINISHED" and run.data.tags["kdray.reused"] == "false"
        history = client.get_metric_history(run.info.run_id, "val/acc")
        assert [m.step for m in history] == [1, 2]
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"model.pt", "config.yaml"}, role
    assert "loss/kd" in children["student"].data.metrics and "loss/kd" not in children["teacher"].data.metrics
    assert children["student"].data.metrics["test/acc"] == first.student.metrics["test/acc"]  # the stored numbers

    again = run_experiment(load_config(None, [*QUICK, "method.temperature=2"]))
    teacher_again, student_again = again.stages
    assert teacher_again.reused and not student_again.reused
    assert teacher_again.plan.key == first.stages[0].plan.key
    reused_run = client.get_run(teacher_again.run_id)
    assert reused_run.data.tags["kdray.reused"] == "true"
    assert reused_run.data.tags["kdray.source_run_id"] == children["teacher"].info.run_id
    assert student_again.plan.key != first.stages[1].plan.key


@pytest.mark.integration
def test_a_model_stored_under_another_tracking_store_is_logged_again_where_it_is_reused(workdir: Path) -> None:
    """The model store outlives (or is shared across) tracking stores: a student reused from it in a new MLflow
    store must load from that store, as kdray's own students do, not point at a run the store lacks."""
    first = run_experiment(load_config(None, [*QUICK, "tracking.uri=sqlite:///first.db"]))
    uri = f"sqlite:///{workdir}/second.db"
    again = run_experiment(load_config(None, [*QUICK, f"tracking.uri={uri}"]))
    assert all(stage.reused for stage in again.stages)
    client = MlflowClient(uri)
    run = client.get_run(again.student.run_id)
    assert run.data.tags["kdray.source_run_id"] == first.student.run_id  # in first.db, not here
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"model.pt", "config.yaml"}
    images = torch.rand(5, 1, 8, 8)
    outputs = []
    for where, run_id in ((f"sqlite:///{workdir}/first.db", first.student.run_id), (uri, run.info.run_id)):
        mlflow.set_tracking_uri(where)
        model_id = MlflowClient(where).get_run(run_id).data.tags["kdray.model_id"]
        outputs.append(mlflow.pytorch.load_model(f"models:/{model_id}")(images))
    assert torch.equal(*outputs)  # the same student, the same input standardisation
    # reused again here: the model this store holds is named, not logged twice
    third = run_experiment(load_config(None, [*QUICK, f"tracking.uri={uri}"]))
    assert client.get_run(third.student.run_id).data.tags["kdray.model_id"] == run.data.tags["kdray.model_id"]
    assert client.list_artifacts(third.student.run_id) == []


def test_student_alone_has_no_teacher_stage(workdir: Path) -> None:
    result = run_experiment(load_config(None, [*QUICK, "method.name=none"]))
    assert [s.plan.role for s in result.stages] == ["student"]


@pytest.mark.integration
def test_stored_student_matches_a_fresh_identical_run(workdir: Path) -> None:
    cfg = load_config(None, [*QUICK, "method.name=none", "store.path=a"])
    first = run_experiment(cfg)
    second = run_experiment(load_config(None, [*QUICK, "method.name=none", "store.path=b"]))
    assert first.student.metrics == second.student.metrics
    a = ModelStore("a").load(first.student.plan.key, _info())
    b = ModelStore("b").load(second.student.plan.key, _info())
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def _info():
    from kdray.models import ModelInfo

    return ModelInfo(num_classes=10, in_channels=1, image_size=8)


def test_unreachable_tracking_server_is_refused_before_training(workdir: Path) -> None:
    cfg = load_config(None, [*QUICK, "tracking.uri=http://127.0.0.1:9"])
    with pytest.raises(ConfigError, match="tracking.uri: cannot reach the MLflow server at http://127.0.0.1:9"):
        run_experiment(cfg)
    assert not Path(".kdray").exists()


def test_failure_marks_runs_failed_and_keeps_stored_teacher(workdir: Path) -> None:
    # The student diverges; the teacher trained before it stays stored and its run FINISHED.
    cfg = load_config(None, [*QUICK, "train.lr=1e30", "train.weight_decay=0", "teacher.lr=0.05"])
    with pytest.raises(TrainingDiverged):
        run_experiment(cfg)
    runs = {r.info.run_name: r for r in _runs(cfg.tracking.uri)}
    assert runs["teacher"].info.status == "FINISHED"
    assert runs["student"].info.status == "FAILED" and runs["kd-plane2"].info.status == "FAILED"
    assert "lower train.lr" in runs["kd-plane2"].data.tags["kdray.error"]
    teacher_key = runs["teacher"].data.tags["kdray.model_key"]
    assert ModelStore(cfg.store.path).find(teacher_key) is not None
    assert ModelStore(cfg.store.path).find(runs["student"].data.tags["kdray.model_key"]) is None


@pytest.mark.integration
def test_a_failure_while_planning_closes_the_claimed_run_and_frees_its_lease(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection after the run is claimed: the parent run must not stay RUNNING nor its lease held, or
    every later run of this config in this process would open a new run beside a dead one."""
    cfg = load_config(None, QUICK)

    def broken_planner(*args: object, **kwargs: object) -> None:
        raise RuntimeError("injected planning failure")

    monkeypatch.setattr("kdray.run.plan_stages", broken_planner)
    with pytest.raises(RuntimeError, match="injected planning failure"):
        run_experiment(cfg)
    (parent,) = _runs(cfg.tracking.uri)
    assert parent.info.status == "FAILED" and "injected" in parent.data.tags["kdray.error"]
    assert not ModelStore(cfg.store.path).lock(f"run-{parent.info.run_id}").is_locked
    monkeypatch.undo()
    again = run_experiment(cfg)  # continues the failed run, as after any failure
    assert again.parent_run_id == parent.info.run_id


@pytest.mark.integration
@pytest.mark.parametrize(
    ("overrides", "terms"),
    [
        (["method.name=dkd", "method.warmup_epochs=2", "method.logit_standardization=true"], {"ce", "tckd", "nckd"}),
        (["method.name=dist"], {"ce", "inter", "intra"}),
        (["method.name=triplet", "method.mining=semihard"], {"ce", "kd", "triplet"}),
        (["method.name=feature_mixup", "method.branches=3"], {"ce", "kd"}),
        (["method.name=stkd", "method.clean_kd=0.5"], {"ce", "kd", "kd_clean"}),
        (["method.name=takd", "teacher.name=plane8", "assistants.depth=1"], {"ce", "kd"}),
        (["method.name=dgkd", "teacher.name=plane8", "assistants.depth=2"], {"ce", "kd"}),
        (["method.name=pacemaker", "student.onthefly=true"], {"ce", "kd_pacemaker", "kd_teacher"}),
        (["method.name=online_branch", "method.branches=2"], {"ce", "kd", "ce_fused", "cd"}),
        (["method.name=dml", "method.peers=3"], {"ce", "kd"}),
        (["method.name=fitnet"], {"ce", "hint"}),
        (["method.name=at"], {"ce", "at"}),
        (["method.name=sp"], {"ce", "sp"}),
        (["method.name=rkd"], {"ce", "rkd_distance", "rkd_angle"}),
        (["method.name=pkt"], {"ce", "pkt"}),
        (["method.name=vid"], {"ce", "vid"}),
        (["method.name=crd", "method.nce_k=256"], {"ce", "crd"}),  # 16384 negatives per sample: a minute on CPU
        (["method.name=reviewkd"], {"ce", "review"}),
    ],
)
def test_every_method_trains_end_to_end_and_logs_its_terms(workdir: Path, overrides: list[str], terms: set) -> None:
    cfg = load_config(None, [*QUICK, "teacher.epochs=1", "train.epochs=1", *overrides])
    result = run_experiment(cfg)
    client = MlflowClient(cfg.tracking.uri)
    student = client.get_run(result.student.run_id)
    logged = {name.removeprefix("loss/") for name in student.data.metrics if name.startswith("loss/")}
    assert logged == terms | {"total"}
    assert student.data.metrics["val/acc"] == result.student.metrics["val/acc"] > 0.1  # chance on digits: 0.1
    assert student.data.tags["kdray.role"] == "student"
    assert ModelStore(cfg.store.path).find(result.student.plan.key) is not None


@pytest.mark.integration
def test_three_concurrent_runs_train_their_shared_models_once(bare_workdir: Path) -> None:
    """Three `kdray train` processes started together in an empty folder, two of them the very same command:
    they create the MLflow store once between them; the store lock on each model's key lets one process train
    it while the others wait and reuse it; the identical command never joins the other's live run (its
    lease is held), so every process has its own parent run and no run gets another's epochs."""
    workdir = bare_workdir
    file = workdir / "shared.yaml"
    file.write_text("teacher: {name: plane4, epochs: 2}\nstudent: {name: plane2}\ntrain: {epochs: 1, batch_size: 64}\n")
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "kdray", "train", str(file), f"method.temperature={t}", f"tracking.run_name=run{t}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for t in (2, 3, 3)
    ]
    for process in processes:
        _, errors = process.communicate(timeout=600)
        assert process.returncode == 0, errors[-3000:]
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    runs = _runs(f"sqlite:///{workdir}/mlflow.db", "kdray")
    assert sorted(run.info.run_name for run in runs if "kdray.config_hash" in run.data.tags and
                  run.data.tags["kdray.role"] == "experiment") == ["run2", "run3", "run3"]  # fmt: skip
    assert {run.info.status for run in runs} == {"FINISHED"}
    teachers = [run for run in runs if run.info.run_name == "teacher"]
    assert sorted(run.data.tags["kdray.reused"] for run in teachers) == ["false", "true", "true"]
    trained = next(run for run in teachers if run.data.tags["kdray.reused"] == "false")
    assert all(run.data.tags["kdray.source_run_id"] == trained.info.run_id for run in teachers if run != trained)
    students = [run for run in runs if run.info.run_name == "student"]
    assert sorted(run.data.tags["kdray.reused"] for run in students) == ["false", "false", "true"]  # run3 once
    for run in runs:  # no run holds two trainings' epochs
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")]
        assert len(steps) == len(set(steps)), (run.info.run_name, steps)
    assert [m.step for m in client.get_metric_history(trained.info.run_id, "val/acc")] == [1, 2]


@pytest.mark.integration
def test_a_teacher_damaged_in_the_store_is_retrained_not_taught_from(
    workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's repro: a stored teacher's bytes zeroed in place (same size). The next student must not
    learn from it: the entry is quarantined and the teacher trained again, to the same weights (same seed)."""
    first = run_experiment(load_config(None, QUICK))
    teacher = first.stages[0].stored
    original = torch.load(teacher.weights, weights_only=True)
    zero_in_place(teacher.weights)
    with caplog.at_level(logging.WARNING, logger="kdray.store"):
        again = run_experiment(load_config(None, [*QUICK, "method.temperature=3.3"]))
    assert any(f"entry {teacher.key} moved to" in record.getMessage() for record in caplog.records)
    retrained = again.stages[0]
    assert not retrained.reused and retrained.plan.key == teacher.key
    reloaded = torch.load(retrained.stored.weights, weights_only=True)
    assert all(torch.equal(original[name], reloaded[name]) for name in original)  # seeded: the same teacher again
    assert len(list((workdir / ".kdray" / "store" / ".quarantine").iterdir())) == 1
    # MLflow shows a new teacher run that trained, and the summary's numbers are the retrained teacher's
    uri = load_config(None, QUICK).tracking.uri
    assert MlflowClient(uri).get_run(retrained.run_id).data.tags["kdray.reused"] == "false"
    assert retrained.metrics == first.stages[0].metrics
