from pathlib import Path

import pytest
import torch

from kdray.build import lr_factor
from kdray.data import load_dataset
from kdray.engine import TrainingDiverged, best_epoch
from kdray.resolve import load_config
from kdray.stages import plan_stages
from tests.conftest import fit_stage

QUICK = ["train.epochs=2", "teacher.name=plane4", "student.name=plane2", "method.name=none", "train.batch_size=64"]


@pytest.mark.integration
def test_two_runs_with_one_seed_are_identical(workdir: Path) -> None:
    cfg = load_config(None, QUICK)
    data = load_dataset(cfg.data)
    (plan,) = plan_stages(cfg, data.fingerprint())
    first, _ = fit_stage(cfg, plan, data)
    second, _ = fit_stage(cfg, plan, data)
    assert first.final == second.final
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict.values(), second.state_dict.values(), strict=True))
    reseeded = load_config(None, [*QUICK, "train.seed=1"])
    (other_plan,) = plan_stages(reseeded, data.fingerprint())
    assert other_plan.key != plan.key
    other, _ = fit_stage(reseeded, other_plan, data)
    assert any(not torch.equal(a, b) for a, b in zip(first.state_dict.values(), other.state_dict.values(), strict=True))


@pytest.mark.integration
def test_training_learns_digits_and_logs_every_epoch(workdir: Path) -> None:
    cfg = load_config(None, ["train.epochs=4", "student.name=resnet8", "method.name=none", "train.batch_size=64"])
    data = load_dataset(cfg.data)
    (plan,) = plan_stages(cfg, data.fingerprint())

    result, sink = fit_stage(cfg, plan, data)
    assert len(sink.history) == 4
    assert all({"loss/ce", "loss/total", "val/acc", "val/loss", "lr", "images_per_s"} <= set(m) for m in sink.history)
    assert sink.history[-1]["val/acc"] > sink.history[0]["val/acc"]
    assert result.final["val/acc"] > 0.6 and result.final["test/acc"] > 0.6  # chance is 0.1


def test_best_epoch_is_chosen_on_validation_and_reports_that_epochs_test() -> None:
    history = [
        {"val/acc": 0.5, "test/acc": 0.9, "loss/total": 1.0},
        {"val/acc": 0.7, "test/acc": 0.6, "loss/total": 0.8},
        {"val/acc": 0.7, "test/acc": 0.8, "loss/total": 0.7},  # ties epoch 2: the first of equals is kept
        {"val/acc": 0.6, "test/acc": 0.7, "loss/total": 0.6},
    ]
    assert best_epoch(history) == {"best_epoch": 2.0, "best_epoch/val/acc": 0.7, "best_epoch/test/acc": 0.6}


@pytest.mark.integration
def test_test_each_epoch_logs_test_per_epoch_and_keeps_the_stored_models_key(workdir: Path) -> None:
    cfg = load_config(None, [*QUICK, "train.epochs=3", "train.test_each_epoch=true"])
    data = load_dataset(cfg.data)
    (plan,) = plan_stages(cfg, data.fingerprint())
    (plain,) = plan_stages(load_config(None, [*QUICK, "train.epochs=3"]), data.fingerprint())
    assert plan.key == plain.key  # the same weights: evaluating more does not make another model
    result, sink = fit_stage(cfg, plan, data)
    assert all("test/acc" in metrics for metrics in sink.history)
    assert result.final["test/acc"] == sink.history[-1]["test/acc"]
    best = max(range(3), key=lambda epoch: (sink.history[epoch]["val/acc"], -epoch))
    assert result.final["best_epoch"] == best + 1
    assert result.final["best_epoch/test/acc"] == sink.history[best]["test/acc"]
    plain_result, plain_sink = fit_stage(load_config(None, [*QUICK, "train.epochs=3"]), plain, data)
    assert all("test/acc" not in metrics for metrics in plain_sink.history)
    assert plain_result.final["test/acc"] == result.final["test/acc"]  # same training, same last-epoch test
    assert "best_epoch/test/acc" not in plain_result.final


def test_diverging_loss_stops_with_a_clear_error(workdir: Path) -> None:
    cfg = load_config(None, [*QUICK, "train.lr=1e30", "train.weight_decay=0"])
    data = load_dataset(cfg.data)
    (plan,) = plan_stages(cfg, data.fingerprint())
    with pytest.raises(TrainingDiverged, match="lower train.lr"):
        fit_stage(cfg, plan, data)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.schedule=constant"], [1.0] * 10),
        (
            ["train.schedule=step", "train.step_size=2", "train.gamma=0.5"],
            [1, 1, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125, 0.0625, 0.0625],
        ),
        (["train.schedule=multistep", "train.milestones=[3, 8]"], [1, 1, 1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01]),
    ],
)
def test_lr_schedules_per_epoch(overrides: list[str], expected: list[float]) -> None:
    train = load_config(None, ["train.epochs=10", *overrides]).train
    factor = lr_factor(train, steps_per_epoch=4)
    assert [factor(epoch * 4) for epoch in range(10)] == pytest.approx(expected)


def test_cosine_with_warmup() -> None:
    train = load_config(None, ["train.epochs=10", "train.warmup_epochs=2"]).train
    factor = lr_factor(train, steps_per_epoch=5)
    assert [factor(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert factor(10) == pytest.approx(1.0)  # warm-up done: cosine starts at the peak
    assert factor(30) == pytest.approx(0.5)  # half-way through the cosine part
    assert factor(49) < 0.01
