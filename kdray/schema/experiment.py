"""The whole experiment: every section, the base of a method's parameters, and the checks that span sections
without asking any registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_validator, model_validator

from kdray.schema.data import DataConfig
from kdray.schema.fields import Section
from kdray.schema.models import AssistantsConfig, ModelConfig, TeacherConfig
from kdray.schema.search import SearchConfig
from kdray.schema.storage import GUIDE_OUTPUTS_FOLDER, GuideCacheConfig, StoreConfig, TrackingConfig
from kdray.schema.training import ScalingConfig, TrainConfig


class MethodParams(BaseModel):
    """Base of every method's hyperparameters (each method defines its own next to its code); ``name``
    selects the method."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str

    # A method's parameters are its math, so all of them enter its models' store keys but these (none so far).
    not_in_weights: ClassVar[frozenset[str]] = frozenset()
    # Fields added after models were stored, each with the default that computes what the method computed
    # before it existed: left out of a stage's identity at that default, so stored models keep their keys.
    added_later: ClassVar[dict[str, Any]] = {}

    def identity(self) -> dict[str, Any]:
        """What of these parameters determines the trained weights (part of a stage's store key)."""
        dumped = self.model_dump(mode="json", exclude=set(self.not_in_weights))
        return {k: v for k, v in dumped.items() if k not in self.added_later or v != self.added_later[k]}


class ExperimentConfig(Section):
    """A whole experiment. ``kdray.resolve.validate_config`` builds one from a file's mapping: it looks the
    method's parameter model up and checks every registered name, so a config held here is runnable."""

    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: ModelConfig = Field(default_factory=ModelConfig)
    method: SerializeAsAny[MethodParams] = Field(
        description="The method's own parameter model (its `Params`), built by kdray.resolve from {name: ..., fields}."
    )
    assistants: AssistantsConfig = Field(default_factory=AssistantsConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    guide_cache: GuideCacheConfig = Field(default_factory=GuideCacheConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)

    @field_validator("method", mode="before")
    @classmethod
    def _method_resolved(cls, value: Any) -> Any:
        """Plain data here would be read as the bare base class and lose the method's own fields."""
        if not isinstance(value, MethodParams):
            raise ValueError("a method's parameter model; build the config with kdray.resolve.validate_config")
        return value

    @property
    def guide_cache_folder(self) -> Path:
        """Where the guide-output cache lives: ``guide_cache.path``, else inside the model store's folder, or for a
        store in a bucket in the node's own cache folder (``data.cache_dir``): the cache is read row by row at every
        batch, which a memory-mapped local file serves and a bucket would turn into a request per batch
        (docs/cluster.md)."""
        if self.guide_cache.path:
            return Path(self.guide_cache.path)
        if "://" in self.store.path:
            return Path(self.data.cache_dir) / GUIDE_OUTPUTS_FOLDER
        return Path(self.store.path) / GUIDE_OUTPUTS_FOLDER

    @model_validator(mode="after")
    def _sync_batchnorm_needs_gpu_workers(self) -> ExperimentConfig:
        if self.scaling.sync_batchnorm and (
            self.scaling.num_workers < 1 or self.scaling.use_gpu is False or self.scaling.parallelism != "data"
        ):
            raise ValueError(
                "scaling.sync_batchnorm: needs data-parallel GPU workers (num_workers >= 1, use_gpu not false, "
                "parallelism=data); PyTorch's SyncBatchNorm runs on CUDA only"
            )
        return self

    def dump(self) -> dict[str, Any]:
        """Plain data (JSON/YAML-safe); ``kdray.resolve.validate_config`` turns it back."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.dump(), sort_keys=False)


def has_field(model: BaseModel, dotted: str) -> bool:
    """Whether ``dotted`` (``train.lr``) names a field of ``model``'s sections."""
    node: Any = model
    for part in dotted.split("."):
        if not isinstance(node, BaseModel) or part not in type(node).model_fields:
            return False
        node = getattr(node, part)
    return True
