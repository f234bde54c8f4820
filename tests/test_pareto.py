"""Accuracy x cost: the student's size as a searchable knob (families), its cost measured once per architecture,
and a search over several objectives that gives back its Pareto front (tags, report, registered students, study).
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
from mlflow import MlflowClient

from kdray.cost import NOISY, ROUNDS, cached_cost, count_macs, least_disturbed, spread
from kdray.models import MODELS, ModelInfo, build_model, code_version, parameter_count
from kdray.models.families import sized_name
from kdray.resolve import load_config
from kdray.schema import ConfigError, Constraint
from kdray.schema.search import CostConfig, Objective
from kdray.search.driver import optuna_url, run_search
from kdray.search.pareto import front
from kdray.search.report import WINNER_MARK, report_by_name

DIGITS = ModelInfo(num_classes=10, in_channels=1, image_size=8)


# --- families: the size knobs ---------------------------------------------------------------------------------


def test_a_size_of_a_registered_model_is_that_model() -> None:
    """resnet8 at depth 20 is resnet20 itself: the same name, code version and so store key as before."""
    assert sized_name("resnet8", 20, None) == "resnet20" and sized_name("resnet20", None, 1.0) == "resnet20"
    assert sized_name("wrn_16_2", 40, None) == "wrn_40_2" and sized_name("plane2", 10, None) == "plane10"
    assert (
        sized_name("mobilenetv2", None, 0.5) == "mobilenetv2" and sized_name("shufflenetv2", None, 1) == "shufflenetv2"
    )
    assert all(name in MODELS for name in ("resnet20", "wrn_40_2", "plane10", "mobilenetv2", "shufflenetv2"))


def test_sized_models_have_the_channels_their_width_says() -> None:
    """resnet20_w0.5: 8-8-16-32 channels; its parameters counted by hand from the layers."""
    model = build_model(sized_name("resnet8", 20, 0.5), DIGITS)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].out_channels == 8 and {c.out_channels for c in convs} == {8, 16, 32}

    def block(cin: int, cout: int, shortcut: bool) -> int:  # two 3x3 convs + two BNs (+ 1x1 conv + BN)
        return 9 * cin * cout + 9 * cout * cout + 4 * cout + ((cin * cout + 2 * cout) if shortcut else 0)

    by_hand = 9 * 1 * 8 + 2 * 8  # stem conv + BN
    by_hand += 3 * block(8, 8, False)
    by_hand += block(8, 16, True) + 2 * block(16, 16, False)
    by_hand += block(16, 32, True) + 2 * block(32, 32, False)
    by_hand += 32 * 10 + 10  # the classifier
    assert parameter_count(model) == by_hand
    assert code_version("resnet20_w0.5") != code_version("resnet20")  # its own key


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["student.depth=9"], r"student.depth: CIFAR ResNet takes depths 6n\+2"),
        (["student.name=plane2", "student.width=2"], r"student.width: plain CNN has no width knob"),
        (["student.name=resnet32x4", "student.depth=8"], r"student.depth: resnet32x4 has no size knobs"),
        (["student.name=shufflenetv2", "student.width=0.7"], r"ShuffleNetV2 takes widths 0.5, 1, 1.5 or 2"),
    ],
)
def test_a_size_outside_the_family_is_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_the_resolved_config_names_the_sized_model() -> None:
    cfg = load_config(None, ["student.depth=14", "student.width=0.5"])
    assert (cfg.student.name, cfg.student.depth, cfg.student.width) == ("resnet14_w0.5", None, None)


# --- the cost -------------------------------------------------------------------------------------------------


def test_macs_are_the_layers_multiply_accumulates() -> None:
    """plane2 on 8x8 digits, by hand: conv 1->16 at 8x8, pool, conv 16->16 at 4x4, pool, linear 64->10."""
    by_hand = 16 * 1 * 9 * 8 * 8 + 16 * 16 * 9 * 4 * 4 + 64 * 10
    assert count_macs(build_model("plane2", DIGITS).eval(), torch.zeros(1, 1, 8, 8)) == by_hand


def test_an_architecture_is_measured_once_per_machine(tmp_path: Path) -> None:
    cost = CostConfig(repeats=5, warmup=1, batch=8)
    first, measured = cached_cost("plane2", DIGITS, cost, tmp_path)
    again, measured_again = cached_cost("plane2", DIGITS, cost, tmp_path)
    other, measured_other = cached_cost("plane4", DIGITS, cost, tmp_path)
    assert (measured, measured_again, measured_other) == (True, False, True)
    assert again == first and other.params > first.params
    assert first.params == parameter_count(build_model("plane2", DIGITS)) and first.latency_ms > 0
    assert first.latency_p10_ms <= first.latency_ms <= first.latency_p90_ms and first.throughput > 0


# --- the front, against a second computation ------------------------------------------------------------------


def test_the_front_is_what_brute_force_says_and_constraints_remove_points() -> None:
    rng = random.Random(0)
    points = {
        str(i): {"val/acc": rng.random(), "latency_ms": rng.random(), "params": rng.randint(1, 100)} for i in range(60)
    }
    objectives = [Objective(metric="val/acc", mode="max"), Objective(metric="latency_ms", mode="min")]
    bound = [Constraint("params", "<=", 50)]
    for constraints in ([], bound):
        found = set(front(points, objectives, constraints))
        ok = {k for k, v in points.items() if all(v["params"] <= c.bound for c in constraints)}
        # a second formula: a point is on the front iff no feasible point is >= in accuracy and <= in latency with
        # one of them strict
        expected = {
            k for k in ok
            if not any(
                points[o]["val/acc"] >= points[k]["val/acc"] and points[o]["latency_ms"] <= points[k]["latency_ms"]
                and (points[o]["val/acc"], points[o]["latency_ms"]) != (points[k]["val/acc"], points[k]["latency_ms"])
                for o in ok
            )
        }  # fmt: skip
        assert found == expected and found
    assert any(points[k]["params"] > 50 for k in front(points, objectives, [])), "the bound must matter here"
    assert all(points[k]["params"] <= 50 for k in front(points, objectives, bound))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["search.objectives=[{metric: val/acc, mode: max}, {metric: latency_ms, mode: min}]"],
         r"search.scheduler: ASHA stops trials on one metric"),
        (['search.constraints=["params <= 1e6"]', "search.scheduler.name=none"],
         r"search.constraints: bound the front of several objectives; give search.objectives too"),
    ],
)  # fmt: skip
def test_what_several_objectives_cannot_work_with_is_refused(overrides: list[str], message: str) -> None:
    from kdray.search.space import check_space

    with pytest.raises(ConfigError, match=message):
        check_space(
            load_config(None, ["search.space={method.temperature: {kind: float, low: 1, high: 4}}", *overrides])
        )


# --- a search over size and distillation ----------------------------------------------------------------------


@pytest.mark.slow  # a search of 6 trials and the references of its front
def test_a_search_gives_back_its_pareto_front(local_ray: None, workdir: Path) -> None:
    bound = 20_000
    (workdir / "pareto.yaml").write_text(
        json.dumps({
            "search": {
                "objectives": [{"metric": "val/acc", "mode": "max"}, {"metric": "latency_ms", "mode": "min"}],
                "constraints": [f"params <= {bound}"],
                "cost": {"repeats": 10, "warmup": 2, "batch": 16},
                "space": {
                    "student.depth": {"kind": "int", "low": 8, "high": 14, "step": 6},
                    "student.width": {"kind": "choice", "values": [0.25, 1.0]},
                    "method.temperature": {"kind": "float", "low": 1, "high": 8},
                },
            }
        })
    )  # fmt: skip
    cfg = load_config(
        workdir / "pareto.yaml",
        ["teacher.name=plane4", "teacher.epochs=2", "train.epochs=2", "scaling.threads=1", "search.num_samples=6",
         "search.scheduler.name=none", "search.references=[none]", "tracking.experiment=pareto"],
    )  # fmt: skip
    outcome = run_search(cfg, "pareto")
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name("pareto").experiment_id
    trials = [r for r in client.search_runs([experiment]) if r.data.tags.get("kdray.role") == "trial"]
    assert len(trials) == 6 and {r.info.status for r in trials} == {"FINISHED"}
    points = {r.info.run_id: r.data.metrics for r in trials}
    on_front = {r.info.run_id for r in trials if r.data.tags["kdray.pareto"] == "true"}
    objectives = [Objective(metric="val/acc", mode="max"), Objective(metric="latency_ms", mode="min")]
    assert on_front == set(front(points, objectives, [Constraint("params", "<=", bound)])) and on_front
    for run_id in on_front:  # no front member is dominated by any trial that meets the constraint
        assert points[run_id]["params"] <= bound
    assert any(points[r]["params"] > bound for r in points), "the sampled trials include one over the bound"
    # each architecture measured once in this search, read back by its other trials
    by_model: dict[str, list[str]] = {}
    for run in trials:
        by_model.setdefault(run.data.params["student.name"], []).append(run.data.tags["kdray.cost_source"])
    assert all(sources.count("measured") == 1 for sources in by_model.values()), by_model
    # the report (kdray report, from MLflow) and the persisted Optuna study hold the same front
    again = report_by_name(outcome.name, cfg.tracking.uri)
    assert set(again.front) == on_front and "## Pareto front" in again.markdown
    study = optuna.load_study(study_name=outcome.name, storage=optuna_url(cfg))
    assert {t.user_attrs["run_id"] for t in study.best_trials} == on_front
    # every front member's student registered, a version each, with its cost; each loads
    name = "pareto-pareto"
    versions = client.search_model_versions(f"name='{name}'")
    names = {r.info.run_id: r.info.run_name.removeprefix(WINNER_MARK) for r in trials}
    assert sorted(v.tags["trial"] for v in versions) == sorted(names[run_id] for run_id in on_front)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    try:
        for version in versions:
            assert float(version.tags["params"]) <= bound and "latency_ms" in version.tags
            student = mlflow.pytorch.load_model(f"models:/{name}/{version.version}")
            assert student(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    finally:
        mlflow.set_tracking_uri(None)
    # the student alone on every front architecture, and the front plot
    architectures = {r.data.params["student.name"] for r in trials if r.info.run_id in on_front}
    references = [r for r in client.search_runs([experiment]) if r.data.tags.get("kdray.role") == "reference"]
    assert sorted(r.data.tags["kdray.pareto_model"] for r in references) == sorted(architectures)
    plots = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(outcome.parent_run_id, "plots")}
    assert "pareto_front.png" in plots


def test_a_latency_round_disturbed_by_other_work_is_timed_again_and_the_quietest_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Other work on the machine stretches the slow tail (a real search's resnet14: median 0.90 ms, 90th
    percentile 3.97 ms, beside two trainings). Such a round is timed again; the round with the lowest median
    is kept; a quiet round ends it; after ``ROUNDS`` disturbed rounds the best is kept with a warning."""
    quiet = [1.0] * 18 + [1.05, 1.1]
    busy = [2.0] * 10 + [9.0] * 10  # median 5.5, 90th percentile 9: spread 1.6
    busier = [3.0] * 10 + [12.0] * 10
    rounds = iter([busier, busy, quiet])
    assert least_disturbed(lambda: next(rounds), "resnet14") == quiet  # stopped at the quiet third
    assert spread(quiet) <= NOISY < spread(busy)
    rounds = iter([busier, busy, busier, quiet])
    with caplog.at_level(logging.WARNING, logger="kdray.cost"):
        assert least_disturbed(lambda: next(rounds), "resnet14") == busy  # three rounds at most: the lowest median
    assert next(rounds) == quiet and ROUNDS == 3
    (warning,) = [record.getMessage() for record in caplog.records]
    assert warning.startswith("cost of resnet14: latency disturbed by other work on this machine in 3 rounds")
    rounds = iter([quiet, busy])
    assert least_disturbed(lambda: next(rounds), "plane2") == quiet and next(rounds) == busy  # quiet: one round
