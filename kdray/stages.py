"""An experiment as an ordered list of stages; each stage trains (or reuses) one stored model.

Teachers, assistant chains and pacemakers are not special engines: a stage is an ordinary run whose
finished model becomes a guide of later stages. Each stage's store key is computed from its identity
before anything trains, so reuse is decided up front, and an assistant shared by two experiments (or
two search trials) with the same recipe and guides is trained once.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from kdray.config import ExperimentConfig, MethodParams, ModelConfig, TrainConfig
from kdray.ladders import pick_assistants
from kdray.methods import METHODS
from kdray.store import model_key


class StagePlan(BaseModel):
    """One model to produce: its role, architecture, method, training recipe and guides (by store key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: str
    model: ModelConfig
    method: MethodParams
    train: TrainConfig
    guides: list[str]
    key: str


def stage_identity(
    cfg: ExperimentConfig,
    model: ModelConfig,
    method: MethodParams,
    train: TrainConfig,
    guides: list[str],
    fingerprint: str,
) -> dict[str, Any]:
    """Everything that determines a trained model's weights, and nothing that does not."""
    recipe = train.model_dump(mode="json")
    for speed_only in ("eval_batch_size", "channels_last", "compile"):  # same math, other kernels
        recipe.pop(speed_only)
    identity = {
        # Data parallelism: the global batch, and so the result, depends on the number of workers.
        # Branch parallelism computes what one process computes.
        "world_size": max(1, cfg.scaling.num_workers) if cfg.scaling.parallelism == "data" else 1,
        "model": model.model_dump(mode="json"),
        "data": {"fingerprint": fingerprint, "augment": cfg.data.augment.model_dump(mode="json")},
        "train": recipe,
        "method": method.model_dump(mode="json"),
        "guides": guides,
    }
    if guides and cfg.guide_cache.enabled and cfg.guide_cache.dtype != "float32":
        identity["guide_logits"] = cfg.guide_cache.dtype  # rounded soft targets: another model
    return identity


class _Planner:
    def __init__(self, cfg: ExperimentConfig, fingerprint: str, owner: str) -> None:
        self.cfg = cfg
        self.fingerprint = fingerprint
        self.owner = owner
        self.plans: list[StagePlan] = []

    def add(self, role: str, model: ModelConfig, method: MethodParams, guides: list[str], train: TrainConfig) -> str:
        identity = stage_identity(self.cfg, model, method, train, guides, self.fingerprint)
        if not self.cfg.store.reuse:
            identity["owner"] = self.owner  # store.reuse=false: models of this run only
        key = model_key(identity)
        self.plans.append(StagePlan(role=role, model=model, method=method, train=train, guides=guides, key=key))
        return key

    def teacher(self) -> str:
        cfg = self.cfg
        recipe = cfg.train.model_copy(
            update={"epochs": cfg.teacher.epochs or cfg.train.epochs, "lr": cfg.teacher.lr or cfg.train.lr}
        )
        model = ModelConfig.model_validate(cfg.teacher.model_dump(include=set(ModelConfig.model_fields)))
        return self.add("teacher", model, METHODS["none"].Params(), [], recipe)


def plan_stages(cfg: ExperimentConfig, fingerprint: str, owner: str = "") -> list[StagePlan]:
    """The stages of ``cfg`` in training order; the student is always last.

    ``owner`` (the MLflow run of an experiment, the Tune trial of a search) enters the keys when
    ``store.reuse`` is false, so no other run shares the models, while a resumed run finds its own.
    """
    planner = _Planner(cfg, fingerprint, owner)
    method = cfg.method
    guidance = METHODS[method.name].guidance(method)
    guides: list[str] = []
    if guidance == "teacher":
        guides = [planner.teacher()]
    elif guidance == "chain":
        # Every link learns by the chain's method. TAKD: from the next larger model only; DGKD: from
        # every larger model (teacher first), as ``METHODS[...].dense`` says.
        chain = [planner.teacher()]
        dense = getattr(METHODS[method.name], "dense", False)
        for index, name in enumerate(pick_assistants(cfg.teacher.name, cfg.student.name, cfg.assistants), start=1):
            link = list(chain) if dense else [chain[-1]]
            chain.append(planner.add(f"assistant{index}", ModelConfig(name=name), method, link, cfg.train))
        guides = list(chain) if dense else [chain[-1]]
    elif guidance == "pacemaker":
        teacher = planner.teacher()
        pacemaker_model = ModelConfig(name=method.pacemaker or cfg.student.name)  # type: ignore[union-attr]
        pacemaker_method = METHODS["kd"].Params(temperature=method.temperature, alpha=method.alpha)  # type: ignore[union-attr]
        pacemaker = planner.add("pacemaker", pacemaker_model, pacemaker_method, [teacher], cfg.train)
        guides = [pacemaker, teacher]
    planner.add("student", cfg.student, method, guides, cfg.train)
    return planner.plans
