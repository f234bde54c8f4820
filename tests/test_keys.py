"""Store keys cannot drift: every field says whether it determines a trained model's weights, and the keys of
real stages are pinned. A failure here means every user's stored teachers would be retrained: change a golden
value only as a deliberate, documented decision (docs/reliability.md, "Key versions")."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from kdray.build import model_info
from kdray.data import load_dataset
from kdray.methods import METHODS
from kdray.resolve import load_config
from kdray.schema import AugmentConfig, MethodParams, ModelConfig, Section, TeacherConfig, TrainConfig
from kdray.stages import plan_stages
from kdray.store import STORE_FORMAT, model_key

ROOT = Path(__file__).resolve().parents[1]
KEYED_SECTIONS = [TrainConfig, ModelConfig, TeacherConfig, AugmentConfig]


@pytest.mark.parametrize("section", KEYED_SECTIONS, ids=lambda section: section.__name__)
def test_every_field_of_a_keyed_section_says_whether_it_determines_the_weights(section: type[Section]) -> None:
    fields = set(section.model_fields)
    undeclared = fields - section.in_weights - section.not_in_weights
    assert not undeclared, f"{section.__name__}: add {sorted(undeclared)} to in_weights or not_in_weights"
    assert not section.in_weights & section.not_in_weights
    assert section.in_weights | section.not_in_weights <= fields  # no stale name
    assert set(section.added_later) <= section.in_weights


@pytest.mark.parametrize("name", METHODS.names())
def test_a_methods_declarations_name_its_own_fields(name: str) -> None:
    params: type[MethodParams] = METHODS[name].Params
    assert set(params.added_later) | params.not_in_weights <= set(params.model_fields)


def test_a_field_added_later_at_its_default_leaves_the_key_as_it_was() -> None:
    class Before(Section):
        in_weights = frozenset({"lr"})
        lr: float = 0.1

    class After(Before):
        in_weights = frozenset({"lr", "clip"})
        added_later = {"clip": None}
        clip: float | None = None

    assert After().identity() == Before().identity() == {"lr": 0.1}
    assert After(clip=1.0).identity() == {"lr": 0.1, "clip": 1.0}


def test_a_field_declared_not_in_the_weights_leaves_the_key_alone() -> None:
    assert TrainConfig(compile=True, eval_batch_size=7).identity() == TrainConfig().identity()
    assert TrainConfig(lr=0.2).identity() != TrainConfig().identity()


# The identities of every section and method at their defaults, pinned: a new field that enters a key without
# ``added_later`` changes one of these.
DEFAULT_IDENTITIES = {
    "train": "f1299fe5ae8cb48460529aed",
    "model": "422c9ff235dddc15eaec5d11",
    "augment": "635d7718f4ec8237d91962c0",
    "none": "aa76223813264e1de49dfb33",
    "kd": "bf7916ff634043cfe57f939d",
    "dkd": "13bd956f4a8bca8758ddb7f0",
    "dist": "0ea006f21063ccb044861a96",
    "triplet": "219999bf00941ced913a0749",
    "feature_mixup": "79f5583de53fe932530ac905",
    "stkd": "7c7153cc75c6b329d66a8f9f",
    "takd": "19759932ea8c46cc50d68105",
    "dgkd": "bf8324dc42f97fe50d937bfb",
    "pacemaker": "b3596bbc7f4d27dd3175170b",
    "online_branch": "ced375ff6417ecdc4f8b8144",
    "dml": "27c8d8716caf0d586d0ce2ba",
    "fitnet": "6b43a328191dda96c8ad2474",
    "at": "7aac1048660aaadb255988e2",
    "sp": "e24dfc913d0623dcd5d12967",
    "rkd": "0559b8ffe1152aef44b339ef",
    "pkt": "0abc77866e4e5d6b548dc47a",
    "vid": "180592e794016cdb84a12479",
    "crd": "8ad6df58f64cbd89276e1be0",
    "reviewkd": "410b7b34ecb19255baf3814b",
}


def _default_identity(name: str) -> dict[str, object]:
    sections: dict[str, type[BaseModel]] = {"train": TrainConfig, "model": ModelConfig, "augment": AugmentConfig}
    section = sections.get(name)
    return section().identity() if section is not None else METHODS[name].Params().identity()  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", list(DEFAULT_IDENTITIES))
def test_default_identities_are_pinned(name: str) -> None:
    assert model_key(_default_identity(name)) == DEFAULT_IDENTITIES[name]


def test_every_registered_method_has_a_pinned_identity() -> None:
    assert set(METHODS.names()) <= set(DEFAULT_IDENTITIES), "pin the new method's default identity above"


def test_store_keys_of_the_quickstart_are_pinned() -> None:
    assert STORE_FORMAT == 2  # key version 2 (docs/reliability.md)
    cfg = load_config(ROOT / "experiments" / "quickstart.yaml")
    dataset = load_dataset(cfg.data)
    assert dataset.fingerprint() == "1c805b3851923d4b89736fa303d7d99c"  # scikit-learn's digits, kdray's split
    keys = {plan.role: plan.key for plan in plan_stages(cfg, dataset.fingerprint(), info=model_info(dataset))}
    assert keys == {"teacher": "533a71c875df2e752ea69034", "student": "a556b6912ecc99ba61ca4794"}


def test_store_keys_of_a_cifar10_chain_are_pinned(tmp_path: Path) -> None:
    """TAKD's Table 1 ladder on CIFAR-10 (teacher plane10, assistant plane4, student plane2); the data's content
    enters through its fingerprint, fixed here (the folder only has to look like CIFAR-10)."""
    (tmp_path / "cifar-10-batches-py").mkdir()
    cfg = load_config(
        ROOT / "experiments" / "takd_cifar10_plain_table1.yaml",
        ["data.name=cifar10", f"data.root={tmp_path}", "data.augment={padding: 0, flip: false}"],
    )
    keys = {plan.role: plan.key for plan in plan_stages(cfg, "cifar10-train-40000")}
    assert keys == {
        "teacher": "db49ea266a34e087f48058be",
        "assistant1": "504708fc5e6d2a1a855a9489",
        "student": "f883033dbeb6b513a68b5079",
    }
