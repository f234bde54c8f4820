"""The model sections: the student, the teacher (trained or given) and the assistants of a chain. Which
architectures exist is the model registry's to say (``kdray.resolve`` checks every name)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field, field_validator, model_validator

from kdray.schema.fields import EPOCHS_MAX, SEED_MAX, Section, weights_source


class ModelConfig(Section):
    in_weights = frozenset({"name", "onthefly", "batchnorm"})
    # Folded into the name when the config is resolved (resnet8 + depth 20 + width 0.5 = resnet20_w0.5), which
    # then carries them into the store key: kdray.models.families.
    not_in_weights = frozenset({"depth", "width"})

    name: str = Field(
        "resnet8",
        description="Architecture: a name from `kdray models`, torchvision.<name>, timm.<name>, or "
        "package.module:callable (a function or class returning a torch.nn.Module).",
    )
    onthefly: bool = Field(False, description="Replace every 3x3 convolution by a 1x3 one (Pacemaker's student).")
    batchnorm: bool = Field(True, description="BatchNorm layers (false: none, e.g. to compare worker counts).")
    depth: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="Resize within the name's family (resnet: 6n+2, wrn: 6n+4, plane: 2-10); "
        "folded into the name (resnet8 + depth 20 = resnet20). Searchable: student.depth.",
    )
    width: float | None = Field(
        None,
        gt=0,
        le=64,
        description="Width multiplier within the name's family (resnet, mobilenetv2; wrn: the widen "
        "factor; shufflenetv2: 0.5/1/1.5/2); folded into the name (resnet20 + width 0.5 = resnet20_w0.5).",
    )


class TeacherConfig(ModelConfig):
    # A trained teacher is keyed as a ModelConfig (its architecture) with its own recipe: epochs, lr and seed
    # enter the key through the recipe it is trained with; a given one is keyed by its weights' hash.
    not_in_weights = frozenset({"epochs", "lr", "seed", "weights", "input_mean", "input_std", "depth", "width"})

    name: str = Field("resnet20", description="Teacher architecture (as student.name).")
    epochs: int | None = Field(None, ge=1, le=EPOCHS_MAX, description="Teacher training epochs; null = train.epochs.")
    lr: float | None = Field(None, gt=0, description="Teacher peak learning rate; null = train.lr.")
    seed: int | None = Field(
        None,
        ge=0,
        le=SEED_MAX,
        description="Teacher training seed; null = train.seed. Fix it to share one teacher among student seeds.",
    )
    weights: str | None = Field(
        None,
        description="A trained teacher, never retrained: a state-dict file (torch.save(model.state_dict())), an "
        "MLflow model URI (runs:/..., models:/NAME/VERSION), or pretrained[:TAG] for torchvision/timm models.",
    )
    input_mean: list[float] | None = Field(
        None,
        description="Per-channel mean (0..1 scale) the given weights expect (null: the data's; pretrained: theirs).",
    )
    input_std: list[float] | None = Field(None, description="Per-channel std the given weights expect (as input_mean).")

    @field_validator("weights")
    @classmethod
    def _weights_source(cls, weights: str | None) -> str | None:
        return None if weights is None else weights_source(weights)

    @model_validator(mode="after")
    def _stats_together(self) -> TeacherConfig:
        if (self.input_mean is None) != (self.input_std is None):
            raise ValueError("teacher.input_mean and teacher.input_std: give both or neither")
        if self.input_mean is not None and self.weights is None:
            raise ValueError("teacher.input_mean: only a given teacher (teacher.weights) has its own normalisation")
        return self


class AssistantsConfig(Section):
    depth: int = Field(0, ge=0, le=8, description="Teacher assistants between teacher and student (takd, dgkd).")
    models: list[str] = Field(
        default_factory=list, description="Ladder to pick assistants from, largest first (default: the built-in one)."
    )
    weights: dict[str, Annotated[str, AfterValidator(weights_source)]] = Field(
        default_factory=dict,
        description="Assistants given already trained, by architecture: {resnet56: path or MLflow URI}; each is "
        "evaluated and stored, never trained (its inputs standardised with the data's statistics).",
    )
