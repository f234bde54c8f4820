"""Stage planning: which models an experiment trains, in which order, from which guides."""

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from pydantic import Field

from kdray.build import model_info
from kdray.data import Batch, load_dataset
from kdray.distributed import local_context
from kdray.ladders import pick_assistants
from kdray.methods import METHODS, Method, StepInfo
from kdray.methods.losses import soft_kl
from kdray.resolve import load_config
from kdray.run import run_experiment
from kdray.schema import AssistantsConfig, ConfigError, MethodParams, ModelConfig
from kdray.stage_runner import StageRunner
from kdray.stages import StagePlanner, plan_stages
from kdray.store import ModelStore
from kdray.tracking import Tracker, flatten


@pytest.mark.parametrize(
    ("depth", "expected"),
    [
        (0, []),
        (1, ["resnet26"]),
        (2, ["resnet32", "resnet20"]),
        (5, ["resnet44", "resnet32", "resnet26", "resnet20", "resnet14"]),
    ],
)
def test_assistants_are_evenly_spaced_on_the_ladder(depth: int, expected: list[str]) -> None:
    assert pick_assistants("resnet56", "resnet8", AssistantsConfig(depth=depth)) == expected


def test_explicit_ladder_and_too_deep_chains() -> None:
    chosen = pick_assistants("resnet110", "resnet8", AssistantsConfig(depth=1, models=["resnet20"]))
    assert chosen == ["resnet20"]
    with pytest.raises(ValueError, match="assistants.depth=3 but the built-in ladder .* has 2 model"):
        pick_assistants("plane8", "plane2", AssistantsConfig(depth=3))
    with pytest.raises(ConfigError, match="assistants.depth=3 but"):
        load_config(None, ["method.name=takd", "teacher.name=plane8", "student.name=plane2", "assistants.depth=3"])
    with pytest.raises(ConfigError, match="only takd, dgkd use assistants"):
        load_config(None, ["assistants.depth=1"])


def _plans(*overrides: str):
    return plan_stages(load_config(None, list(overrides)), fingerprint="f")


def test_takd_links_each_model_to_the_next_larger() -> None:
    plans = _plans("method.name=takd", "teacher.name=plane10", "student.name=plane2", "assistants.depth=2")
    assert [(p.role, p.model.name) for p in plans] == [
        ("teacher", "plane10"),
        ("assistant1", "plane8"),
        ("assistant2", "plane4"),
        ("student", "plane2"),
    ]
    keys = [p.key for p in plans]
    assert [p.guides for p in plans] == [[], keys[:1], keys[1:2], keys[2:3]]
    assert [p.method.name for p in plans] == ["none", "takd", "takd", "takd"]


def test_dgkd_links_each_model_to_every_larger_one() -> None:
    plans = _plans("method.name=dgkd", "teacher.name=plane10", "student.name=plane2", "assistants.depth=2")
    keys = [p.key for p in plans]
    assert [p.guides for p in plans] == [[], keys[:1], keys[:2], keys[:3]]


def test_assistants_are_shared_between_experiments_with_the_same_recipe() -> None:
    base = ("method.name=takd", "teacher.name=plane10", "assistants.depth=1", "assistants.models=[plane6]")
    to_plane2 = _plans(*base, "student.name=plane2")
    to_plane4 = _plans(*base, "student.name=plane4")
    assert to_plane2[1].key == to_plane4[1].key  # the plane6 assistant is trained once for both
    other_temperature = _plans(*base, "student.name=plane2", "method.temperature=2")
    assert other_temperature[0].key == to_plane2[0].key and other_temperature[1].key != to_plane2[1].key


def test_teacher_seed_gives_students_of_every_seed_one_teacher() -> None:
    seeds = [_plans("method.name=kd", "teacher.seed=0", f"train.seed={seed}") for seed in (0, 1)]
    assert seeds[0][0].key == seeds[1][0].key and seeds[0][0].train.seed == 0 == seeds[1][0].train.seed
    assert seeds[0][1].key != seeds[1][1].key  # the students differ
    unfixed = [_plans("method.name=kd", f"train.seed={seed}") for seed in (0, 1)]
    assert unfixed[0][0].key != unfixed[1][0].key  # by default the teacher follows train.seed
    assert unfixed[0][0].key == seeds[0][0].key


def test_without_store_reuse_every_owner_gets_its_own_models() -> None:
    shared = load_config(None, ["method.name=kd"])
    private = load_config(None, ["method.name=kd", "store.reuse=false"])
    first, second = (plan_stages(shared, "data", owner) for owner in ("trial1", "trial2"))
    assert [p.key for p in first] == [p.key for p in second]
    one, other, again = (plan_stages(private, "data", owner) for owner in ("trial1", "trial2", "trial1"))
    assert {p.key for p in one}.isdisjoint(p.key for p in other)
    assert [p.key for p in one] == [p.key for p in again]  # a resumed run finds its own models
    assert one[-1].guides == [one[0].key]


def test_pacemaker_plans_an_nxn_pacemaker_then_the_onthefly_student() -> None:
    plans = _plans("method.name=pacemaker", "teacher.name=resnet20", "student.name=resnet8", "student.onthefly=true")
    teacher, pacemaker, student = plans
    assert (pacemaker.role, pacemaker.model.name, pacemaker.model.onthefly) == ("pacemaker", "resnet8", False)
    assert pacemaker.method.name == "kd" and pacemaker.guides == [teacher.key]
    assert student.model.onthefly and student.guides == [pacemaker.key, teacher.key]


def test_methods_that_learn_alone_plan_one_stage() -> None:
    assert [p.role for p in _plans("method.name=online_branch")] == ["student"]
    assert [p.role for p in _plans("method.name=feature_mixup", "method.w_kd=0")] == ["student"]
    assert [p.role for p in _plans("method.name=feature_mixup")] == ["teacher", "student"]


# --- a method of a new shape: one class in the test, nothing changed in kdray -----------------------


class TwoTeacherParams(MethodParams):
    name: Literal["two_teachers"] = "two_teachers"
    weight: float = Field(0.5, ge=0, le=1, description="Share of the first teacher in the KD target.")
    temperature: float = Field(4.0, gt=0)


class TwoTeachers(Method):
    """KD from two teachers of different architectures, each trained by kdray as its own stage."""

    Params = TwoTeacherParams

    @classmethod
    def plan_guides(cls, params: MethodParams, planner: StagePlanner) -> list[str]:
        second = ModelConfig(name="plane2")
        return [planner.teacher(), planner.add("teacher2", second, METHODS["none"].Params(), [])]

    def forward(self, batch: Batch, step: StepInfo) -> dict[str, torch.Tensor]:
        params: TwoTeacherParams = self.params  # type: ignore[assignment]
        logits = self.student(batch.images)
        first, second = (soft_kl(logits, self.guide(i)(batch), params.temperature) for i in (0, 1))
        return {"ce": F.cross_entropy(logits, batch.labels), "kd": params.weight * first + (1 - params.weight) * second}


@pytest.fixture
def two_teachers() -> Iterator[None]:
    METHODS.add("two_teachers", TwoTeachers)
    yield
    METHODS.remove("two_teachers")


@pytest.mark.integration
def test_a_method_defined_outside_kdray_plans_and_trains_two_teachers(two_teachers: None, workdir: Path) -> None:
    cfg = load_config(
        None,
        [
            "method.name=two_teachers",
            "method.weight=0.25",
            "teacher.name=plane4",
            "student.name=plane2",
            "train.epochs=1",
            "train.batch_size=64",
            "tracking.experiment=two",
        ],
    )
    assert cfg.method == TwoTeacherParams(weight=0.25)  # the config validates the new method's own params
    result = run_experiment(cfg)
    teacher, teacher2, student = (stage.plan for stage in result.stages)
    assert [teacher.role, teacher2.role, student.role] == ["teacher", "teacher2", "student"]
    assert (teacher.model.name, teacher2.model.name) == ("plane4", "plane2")
    assert student.guides == [teacher.key, teacher2.key]
    client = MlflowClient(cfg.tracking.uri)
    kd = client.get_metric_history(result.student.run_id, "loss/kd")
    assert len(kd) == 1 and kd[0].value > 0  # the student learnt from both stored teachers
    assert all(client.get_run(stage.run_id).info.status == "FINISHED" for stage in result.stages)


def test_a_chain_without_assistants_plans_the_very_stage_kd_plans() -> None:
    """takd/dgkd at depth 0 are Hinton KD from the teacher: one student stage (one key), trained once."""
    kd = _plans("method.name=kd", "method.temperature=5", "method.alpha=0.7")
    for chain in ("takd", "dgkd"):
        plans = _plans(f"method.name={chain}", "method.temperature=5", "method.alpha=0.7", "assistants.depth=0")
        assert [p.key for p in plans] == [p.key for p in kd] and plans[-1].method.name == "kd"
    as_coded = _plans("method.name=dgkd", "method.kl_reduction=mean", "assistants.depth=0")
    assert as_coded[-1].method.name == "kd" and as_coded[-1].method.kl_reduction == "mean"  # carried over
    deeper = _plans("method.name=takd", "method.temperature=5", "method.alpha=0.7", "assistants.depth=1")
    assert deeper[-1].method.name == "takd" and deeper[-1].key != kd[-1].key


@pytest.mark.integration
def test_a_chain_at_depth_0_trains_kds_student_in_a_run_that_holds_its_own_config(workdir: Path) -> None:
    """A search trial's student stage runs in the trial's run, whose params are the trial's config (takd):
    the stage planned as kd keeps those params and records its own form in ``kdray.stage.*`` tags."""
    cfg = load_config(
        None,
        [
            "method.name=takd",
            "assistants.depth=0",
            "teacher.name=plane4",
            "teacher.epochs=1",
            "student.name=plane2",
            "train.epochs=1",
            "train.batch_size=64",
            "tracking.experiment=trial-like",
        ],
    )
    dataset = load_dataset(cfg.data)
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    runner = StageRunner(cfg, dataset, ModelStore(cfg.store.path), tracker, local_context(False))
    teacher, student = plan_stages(cfg, dataset.fingerprint(), owner="t", info=model_info(dataset))
    runner.train_missing(teacher, lambda: tracker.start_run("teacher", {}))
    trial = tracker.start_run("takd (t)", {"kdray.role": "trial"})
    tracker.log_params(trial, flatten(cfg.dump()))
    outcome = runner.run(student, trial)
    run = MlflowClient(cfg.tracking.uri).get_run(trial)
    assert run.info.status == "FINISHED" and not outcome.reused
    assert run.data.params["method.name"] == "takd" and run.data.tags["kdray.stage.method.name"] == "kd"
    assert run.data.params["guides"] == teacher.key  # what the trial's config did not hold is a param


@pytest.mark.integration
def test_a_run_with_epochs_of_its_own_that_reuses_a_stored_model_ends_with_the_models_metrics(workdir: Path) -> None:
    """A trial's run that logged an epoch before its process died, and whose student an identical trial then
    stored, reuses it: its last val/acc must be the stored model's (a search ranks trials by it), at the last
    epoch, not its own epoch 1's."""
    cfg = load_config(
        None,
        ["method.name=none", "student.name=plane2", "train.epochs=2", "train.batch_size=64",
         "tracking.experiment=reuse-partial"],
    )  # fmt: skip
    dataset = load_dataset(cfg.data)
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    store = ModelStore(cfg.store.path)
    runner = StageRunner(cfg, dataset, store, tracker, local_context(False))
    (student,) = plan_stages(cfg, dataset.fingerprint(), owner="t", info=model_info(dataset))
    trained = runner.run(student, tracker.start_run("first", {}))
    partial = tracker.start_run("second", {})
    tracker.log_metrics(partial, {"val/acc": 0.125, "val/loss": 2.0}, step=1)  # its own epoch 1, then it died
    outcome = runner.run(student, partial)
    client = MlflowClient(cfg.tracking.uri)
    history = [(m.step, m.value) for m in client.get_metric_history(partial, "val/acc")]
    assert outcome.reused and not trained.reused
    assert history == [(1, 0.125), (2, store.find(student.key).meta["metrics"]["val/acc"])]
    assert client.get_run(partial).data.metrics["val/acc"] == trained.metrics["val/acc"] != 0.125
