"""The experiment schema: what a user may write in an experiment file, section by section, validated field by
field. It is the bottom layer of kdray: it imports no registry and no torch, and every other layer imports it.

Turning a file into a runnable config (the method's own parameters, registered names checked, paths of the
data resolved) is ``kdray.resolve``'s job. Every path field is made absolute here, once: a validated config
means the same files from any working folder (Tune trials and Ray Train workers run in their own).
"""

from kdray.schema.data import AugmentConfig, DataConfig
from kdray.schema.experiment import ExperimentConfig, MethodParams, has_field
from kdray.schema.fields import (
    DEFAULT_METHOD,
    EPOCHS_MAX,
    ConfigError,
    Section,
    absolute_path,
    absolute_uri,
    default_storage_path,
    default_store_path,
    default_tracking_uri,
    plain_name,
)
from kdray.schema.models import AssistantsConfig, ModelConfig, TeacherConfig
from kdray.schema.search import COST_METRICS, Constraint, SamplerConfig, SchedulerConfig, SearchConfig, SearchParam
from kdray.schema.storage import GuideCacheConfig, StoreConfig, TrackingConfig
from kdray.schema.training import ScalingConfig, TrainConfig

__all__ = [
    "DEFAULT_METHOD",
    "EPOCHS_MAX",
    "AssistantsConfig",
    "AugmentConfig",
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "GuideCacheConfig",
    "MethodParams",
    "ModelConfig",
    "COST_METRICS",
    "Constraint",
    "SamplerConfig",
    "ScalingConfig",
    "SchedulerConfig",
    "SearchConfig",
    "SearchParam",
    "Section",
    "StoreConfig",
    "TeacherConfig",
    "TrackingConfig",
    "TrainConfig",
    "absolute_path",
    "absolute_uri",
    "default_storage_path",
    "default_store_path",
    "default_tracking_uri",
    "has_field",
    "plain_name",
]
