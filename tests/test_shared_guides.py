"""Which guides a search trains before its trials: those every corner of the space plans alike."""

from pathlib import Path

import pytest

from kdray.data import load_dataset
from kdray.resolve import load_config
from kdray.search.shared import shared_guides
from tests.test_search import write_experiment

CHAIN = ["teacher.name=plane8", "student.name=plane2"]


def _shared(workdir: Path, space: dict, *overrides: str) -> list[tuple[str, str]]:
    cfg = load_config(write_experiment(workdir, {"space": space}), [*CHAIN, *overrides])
    return [(plan.role, plan.model.name) for plan in shared_guides(cfg, load_dataset(cfg.data))]


def test_the_teacher_is_shared_across_methods_and_chain_depths(workdir: Path) -> None:
    space = {
        "method.name": {"kind": "choice", "values": ["kd", "takd", "dgkd"]},
        "method.temperature": {"kind": "logfloat", "low": 1, "high": 8},
        "assistants.depth": {"kind": "int", "low": 0, "high": 2},
    }
    assert _shared(workdir, space) == [("teacher", "plane8")]


def test_an_assistant_is_shared_when_nothing_searched_changes_it(workdir: Path) -> None:
    chain = ("method.name=takd", "assistants.depth=1", "assistants.models=[plane6]")
    # the student's architecture is searched: the chain above it is the same for both
    students = {"student.name": {"kind": "choice", "values": ["plane2", "plane4"]}}
    assert _shared(workdir, students, *chain) == [("teacher", "plane8"), ("assistant1", "plane6")]
    # takd's loss weight is searched: the assistant is trained by takd too, so it differs; the teacher does not
    alpha = {"method.alpha": {"kind": "float", "low": 0.2, "high": 0.9}}
    assert _shared(workdir, alpha, *chain) == [("teacher", "plane8")]


@pytest.mark.parametrize(
    ("space", "overrides"),
    [
        ({"train.lr": {"kind": "logfloat", "low": 0.01, "high": 0.1}}, ()),  # the teacher trains at train.lr
        ({"teacher.epochs": {"kind": "int", "low": 1, "high": 3}}, ()),
        ({"method.temperature": {"kind": "float", "low": 1, "high": 8}}, ("store.reuse=false",)),  # own models
        ({"method.temperature": {"kind": "float", "low": 1, "high": 8}}, ("search.guides_first=false",)),
    ],
    ids=["train.lr", "teacher.epochs", "no store reuse", "switched off"],
)
def test_nothing_is_trained_ahead_when_a_searched_value_changes_it(
    workdir: Path, space: dict, overrides: tuple[str, ...]
) -> None:
    assert _shared(workdir, space, *overrides) == []
    fixed_lr = _shared(workdir, {"train.lr": {"kind": "logfloat", "low": 0.01, "high": 0.1}}, "teacher.lr=0.05")
    assert fixed_lr == [("teacher", "plane8")]  # a teacher with its own lr does not follow train.lr
