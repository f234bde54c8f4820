"""``kdray store why``: would each stage of a config be reused from the model store, and if not, why not.

A stage is reused when the store holds its key, the hash of its identity (``kdray.stages.stage_identity``).
Each stored model records that identity, so for a stage that would train, the nearest stored entry of the
same role and architecture is found and the fields where the two identities differ are named: a user who
expected a reuse sees which setting, guide or data change made the key differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kdray.build import model_info
from kdray.data import load_dataset
from kdray.schema import ExperimentConfig
from kdray.stages import StagePlan, plan_stages
from kdray.store import ModelStore, StoredModel, open_store


@dataclass(frozen=True)
class Verdict:
    """One stage: reused from the store, or trained, and then how it differs from the nearest stored entry."""

    plan: StagePlan
    reused: bool
    nearest: str | None = None  # the key of the nearest stored entry of the same role and architecture
    differences: tuple[str, ...] = ()  # "field: stored → this config", for each field of the identity that differs

    def line(self) -> str:
        head = f"{self.plan.role:<11} {self.plan.model.name:<12} {self.plan.key}"
        if self.reused:
            return f"{head}  reused"
        if self.nearest is None:
            return f"{head}  would train: no stored {self.plan.role} {self.plan.model.name} with a recorded identity"
        return f"{head}  would train: nearest stored entry {self.nearest} differs in {'; '.join(self.differences)}"


def why(cfg: ExperimentConfig) -> tuple[list[Verdict], int]:
    """Each stage's verdict in training order, and how many entries of the store record no identity (written before
    kdray recorded identities: they are still reused when their key matches, but cannot be compared)."""
    dataset = load_dataset(cfg.data)
    plans = plan_stages(cfg, dataset.fingerprint(), owner="kdray-store-why", info=model_info(dataset))
    store = open_store(cfg.store)
    # Only the metadata is compared: reading it is enough to explain a key, and hashing every stored model's
    # weights (what ``ModelStore.find`` does before a reuse) would read the whole store.
    metas = {key: store.meta(key) for key in store.keys()}  # noqa: SIM118 (a store, not a dict)
    entries = [StoredModel(key, store.root / key, meta) for key, meta in metas.items() if meta]
    recorded = [entry for entry in entries if entry.meta.get("identity")]
    return [_verdict(plan, store, recorded) for plan in plans], len(entries) - len(recorded)


def _verdict(plan: StagePlan, store: ModelStore, recorded: list[StoredModel]) -> Verdict:
    if store.find(plan.key) is not None:
        return Verdict(plan, True)
    alike = [e for e in recorded if e.meta.get("role") == plan.role and e.meta["model"]["name"] == plan.model.name]
    if not alike:
        return Verdict(plan, False)
    wanted = flatten(plan.identity)
    scored = [(differing(flatten(entry.meta["identity"]), wanted), entry.key) for entry in alike]
    differences, key = min(scored, key=lambda pair: (len(pair[0]), pair[1]))
    return Verdict(plan, False, key, tuple(differences))


def differing(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The fields of two flattened identities whose values differ, as ``field: stored → wanted``."""
    missing = object()
    return [
        f"{field}: {stored.get(field, '(none)')} → {wanted.get(field, '(none)')}"
        for field in sorted(stored.keys() | wanted.keys())
        if stored.get(field, missing) != wanted.get(field, missing)
    ]


def flatten(identity: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` as ``{"train.lr": 0.1}``; lists (guides, milestones) stay whole values."""
    flat: dict[str, Any] = {}
    for key, value in identity.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
