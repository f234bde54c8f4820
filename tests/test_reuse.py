"""``kdray store why``: for each stage, reused from the store, or trained and in which fields it differs from the
nearest stored entry (a real store; entries saved as a finished stage saves them, without training)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdray.build import model_info
from kdray.cli import main
from kdray.data import load_dataset
from kdray.models import build_model
from kdray.resolve import load_config
from kdray.stages import plan_stages
from kdray.store import ModelStore

QUICKSTART = str(Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml")


def store_teacher(store_path: Path) -> str:
    """The quickstart's teacher stored with the metadata a finished stage records; its key."""
    cfg = load_config(QUICKSTART, [f"store.path={store_path}"])
    dataset = load_dataset(cfg.data)
    teacher = plan_stages(cfg, dataset.fingerprint(), info=model_info(dataset))[0]
    weights = build_model(teacher.model.name, model_info(dataset)).state_dict()
    meta = {"model": teacher.model.model_dump(), "role": teacher.role, "identity": teacher.identity, "metrics": {}}
    ModelStore(store_path).save(teacher.key, weights, cfg.to_yaml(), meta)
    return teacher.key


def test_why_names_reused_stages_and_the_fields_that_keep_others_from_reuse(
    bare_workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = store_teacher(bare_workdir / "store")
    assert main(["store", "why", QUICKSTART, f"store.path={bare_workdir / 'store'}"]) == 0
    teacher, student = capsys.readouterr().out.splitlines()
    assert teacher.startswith("teacher") and teacher.endswith(f"{key}  reused")
    assert student.startswith("student") and "would train: no stored student resnet8" in student

    assert main(["store", "why", QUICKSTART, "train.lr=0.1", "method.temperature=2", "--store", "store"]) == 0
    teacher, student = capsys.readouterr().out.splitlines()
    assert teacher.endswith(f"would train: nearest stored entry {key} differs in train.lr: 0.05 → 0.1")
    assert "no stored student" in student  # the student's teacher changed too, and no student is stored


def test_why_needs_an_experiment_file(bare_workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["store", "why"]) == 2
    assert "kdray store why: give the experiment file" in capsys.readouterr().err
