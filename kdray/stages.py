"""An experiment as an ordered list of stages; each stage trains (or reuses) one stored model.

Teachers, assistant chains and pacemakers are not special engines: a stage is an ordinary run whose
finished model becomes a guide of later stages. Each stage's store key is computed from its identity
before anything trains, so reuse is decided up front, and an assistant shared by two experiments (or
two search trials) with the same recipe and guides is trained once.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, SerializeAsAny, field_validator

from kdray.given import given_model, given_weights
from kdray.ladders import pick_assistants
from kdray.methods import METHODS, params_model
from kdray.models import ModelInfo, code_version
from kdray.schema import ExperimentConfig, MethodParams, ModelConfig, TrainConfig
from kdray.store import model_key


class StagePlan(BaseModel):
    """One model to produce: its role, architecture, method, training recipe and guides (by store key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: str
    model: ModelConfig
    method: SerializeAsAny[MethodParams]
    train: TrainConfig
    guides: list[str]
    key: str
    identity: dict[str, Any] = {}  # what the key hashes, recorded with the stored model (`kdray store why`)
    weights: str | None = None  # a given model (teacher.weights): evaluated and stored, never trained

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, value: Any) -> MethodParams:
        """A plan read back (a Ray Train worker's) holds its method's own parameter model again."""
        return value if isinstance(value, MethodParams) else params_model(value["name"]).model_validate(value)


def stage_identity(
    cfg: ExperimentConfig,
    model: ModelConfig,
    method: MethodParams,
    train: TrainConfig,
    guides: list[str],
    fingerprint: str,
) -> dict[str, Any]:
    """Everything that determines a trained model's weights, and nothing that does not."""
    identity = {
        # Data parallelism: the global batch, and so the result, depends on the number of workers.
        # Branch parallelism computes what one process computes.
        "world_size": cfg.scaling.data_shards,
        "model": model.identity(),
        "code": code_version(model.name),  # a changed architecture never reuses old weights
        "data": {"fingerprint": fingerprint, "augment": cfg.data.augment.identity()},
        "train": train.identity(),
        "method": method.identity(),
        "guides": guides,
    }
    if guides and cfg.guide_cache.enabled and cfg.guide_cache.dtype != "float32":
        identity["guide_logits"] = cfg.guide_cache.dtype  # rounded soft targets: another model
    return identity


class StagePlanner:
    """What a method's ``plan_guides`` builds its guides with: the experiment (read-only), its teacher,
    its assistant ladder, and ``add`` for any further stage. Stages are listed in training order."""

    def __init__(self, cfg: ExperimentConfig, fingerprint: str, owner: str, info: ModelInfo | None = None) -> None:
        self.cfg = cfg
        self.fingerprint = fingerprint
        self.owner = owner
        self.info = info
        self.plans: list[StagePlan] = []

    def add(
        self, role: str, model: ModelConfig, method: MethodParams, guides: list[str], train: TrainConfig | None = None
    ) -> str:
        """Plan a stage that trains ``model`` by ``method`` from ``guides`` (store keys of earlier stages) with
        ``train`` (default: the experiment's recipe); returns its store key. A stage planned twice is one stage."""
        recipe = train or self.cfg.train
        identity = stage_identity(self.cfg, model, method, recipe, guides, self.fingerprint)
        if not self.cfg.store.reuse:
            identity["owner"] = self.owner  # store.reuse=false: models of this run only
        return self._plan(
            StagePlan(
                role=role,
                model=model,
                method=method,
                train=recipe,
                guides=guides,
                key=model_key(identity),
                identity=identity,
            )  # fmt: skip
        )

    def _plan(self, plan: StagePlan) -> str:
        if all(known.key != plan.key for known in self.plans):
            self.plans.append(plan)
        return plan.key

    def teacher(self) -> str:
        """The experiment's teacher: given (``teacher.weights``), or trained alone with its own epochs, lr and
        seed where the file sets them."""
        cfg = self.cfg
        model = ModelConfig.model_validate(cfg.teacher.model_dump(include=set(ModelConfig.model_fields)))
        if given_weights(cfg, "teacher", model) is not None:
            return self._given("teacher", model)
        recipe = cfg.train.model_copy(
            update={
                "epochs": cfg.teacher.epochs or cfg.train.epochs,
                "lr": cfg.teacher.lr or cfg.train.lr,
                "seed": cfg.train.seed if cfg.teacher.seed is None else cfg.teacher.seed,
            }
        )
        return self.add("teacher", model, METHODS["none"].Params(), [], recipe)

    def assistant(self, index: int, name: str, method: MethodParams, guides: list[str]) -> str:
        """Assistant ``index`` of a chain: given (``assistants.weights``), or trained by ``method`` from ``guides``."""
        role, model = f"assistant{index}", ModelConfig(name=name)
        if given_weights(self.cfg, role, model) is not None:
            return self._given(role, model)
        return self.add(role, model, method, guides)

    def _given(self, role: str, model: ModelConfig) -> str:
        """A given model's stage: keyed by the hash of its weights (and the data it is evaluated on)."""
        if self.info is None:
            raise ValueError("planning a given model needs the data's ModelInfo (plan_stages(..., info=...))")
        given = given_model(self.cfg, role, model, self.info)
        identity = {
            "given": given.digest,
            "stats": given.stats,
            "model": model.identity(),
            "data": {"fingerprint": self.fingerprint},
        }
        source = given_weights(self.cfg, role, model)
        assert source is not None
        none = METHODS["none"].Params()
        plan = StagePlan(
            role=role, model=model, method=none, train=self.cfg.train, guides=[], key=model_key(identity),
            identity=identity, weights=source[0],
        )  # fmt: skip
        return self._plan(plan)

    def assistant_models(self) -> list[str]:
        """The ``assistants.depth`` architectures between teacher and student, largest first."""
        return pick_assistants(self.cfg.teacher.name, self.cfg.student.name, self.cfg.assistants)


def plan_stages(
    cfg: ExperimentConfig, fingerprint: str, owner: str = "", info: ModelInfo | None = None
) -> list[StagePlan]:
    """The stages of ``cfg`` in training order, as its method plans its guides; the student is always last.

    ``owner`` (the MLflow run of an experiment, the Tune trial of a search) enters the keys when
    ``store.reuse`` is false, so no other run shares the models, while a resumed run finds its own.
    ``info`` (the data's shape) is needed only to plan a given teacher, whose weights are read and hashed.
    """
    planner = StagePlanner(cfg, fingerprint, owner, info)
    method = METHODS[cfg.method.name]
    guides = method.plan_guides(cfg.method, planner)
    planner.add("student", cfg.student, method.student_params(cfg.method, planner), guides)
    return planner.plans
