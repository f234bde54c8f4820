"""An experiment as an ordered list of stages; each stage trains (or reuses) one stored model.

Teachers, and later assistant chains, are not special engines: a stage is an ordinary run whose
finished model becomes a guide of the next stage. Each stage's store key is computed from its
identity before anything trains, so reuse is decided up front.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from kdray.config import ExperimentConfig, MethodParams, TrainConfig
from kdray.methods import METHODS
from kdray.store import model_key


class StagePlan(BaseModel):
    """One model to produce: its role, architecture, method, training recipe and guides (by store key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: str
    model: str
    method: MethodParams
    train: TrainConfig
    guides: list[str]
    key: str


def stage_identity(
    cfg: ExperimentConfig, model: str, method: dict[str, Any], train: TrainConfig, guides: list[str], fingerprint: str
) -> dict[str, Any]:
    """Everything that determines a trained model's weights, and nothing that does not."""
    recipe = train.model_dump(mode="json")
    recipe.pop("eval_batch_size")
    return {
        "model": model,
        "data": {
            "fingerprint": fingerprint,
            "augment": cfg.data.augment.model_dump(mode="json"),
        },
        "train": recipe,
        "method": method,
        "guides": guides,
    }


def plan_stages(cfg: ExperimentConfig, fingerprint: str) -> list[StagePlan]:
    """Teacher (when the method needs one), then the student."""
    plans: list[StagePlan] = []
    guides: list[str] = []
    if METHODS[cfg.method.name].needs_teacher:
        teacher_method = METHODS["none"].Params()
        recipe = cfg.train.model_copy(
            update={"epochs": cfg.teacher.epochs or cfg.train.epochs, "lr": cfg.teacher.lr or cfg.train.lr}
        )
        identity = stage_identity(cfg, cfg.teacher.name, teacher_method.model_dump(), recipe, [], fingerprint)
        plans.append(
            StagePlan(
                role="teacher",
                model=cfg.teacher.name,
                method=teacher_method,
                train=recipe,
                guides=[],
                key=model_key(identity),
            )
        )
        guides = [plans[-1].key]
    method = cfg.method.model_dump(mode="json")
    identity = stage_identity(cfg, cfg.student.name, method, cfg.train, guides, fingerprint)
    plans.append(
        StagePlan(
            role="student",
            model=cfg.student.name,
            method=cfg.method,
            train=cfg.train,
            guides=guides,
            key=model_key(identity),
        )
    )
    return plans
