"""The search section: which fields Ray Tune varies, how Optuna samples them and ASHA stops trials. Which
methods a range or a reference names is the method registry's to say (``kdray.resolve`` checks them)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from kdray.schema.fields import EPOCHS_MAX, SEED_MAX, WORKERS_MAX, PlainName, Section


class SearchParam(Section):
    kind: Literal["float", "logfloat", "int", "choice"] = Field(description="Distribution of the parameter.")
    low: float | None = Field(None, description="Lower bound (float, logfloat, int).")
    high: float | None = Field(None, description="Upper bound (float, logfloat, int).")
    values: list[Any] | None = Field(None, description="Choices (choice).")
    methods: list[str] | None = Field(
        None, description="method.* parameters: only for these methods (default: every method that has the field)."
    )

    @model_validator(mode="after")
    def _bounds(self) -> SearchParam:
        if self.kind == "choice":
            if not self.values:
                raise ValueError("a choice parameter needs values: [...]")
        elif self.low is None or self.high is None or self.low >= self.high:
            raise ValueError(f"a {self.kind} parameter needs low < high (here low={self.low}, high={self.high})")
        elif self.kind == "logfloat" and self.low <= 0:
            raise ValueError("a logfloat parameter needs low > 0")
        return self


class SchedulerConfig(Section):
    name: Literal["asha", "none"] = Field("asha", description="asha: stop weak trials early (ASHA); none: run all.")
    grace_period: int = Field(
        1, ge=1, le=EPOCHS_MAX, description="ASHA: epochs every trial runs before it can be stopped."
    )
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: 1/reduction_factor of trials go on at each rung.")
    max_t: int | None = Field(
        None, ge=1, le=EPOCHS_MAX, description="ASHA: the most epochs of a trial (null = train.epochs)."
    )


class SamplerConfig(Section):
    name: Literal["tpe", "gp", "random"] = Field("tpe", description="Optuna sampler: TPE, Gaussian process, random.")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Sampler seed: the same search proposes the same trials.")


class SearchConfig(Section):
    name: PlainName | None = Field(None, description="Search name (Tune folder, MLflow run); null = <file>-<time>.")
    metric: str = Field("val/acc", description="Metric of the final student the search optimises (a val/* metric).")
    mode: Literal["max", "min"] = Field("max", description="Maximise or minimise the metric.")
    num_samples: int = Field(8, ge=1, le=1_000_000, description="Number of trials.")
    max_concurrent_trials: int = Field(2, ge=1, le=WORKERS_MAX, description="Trials running at the same time.")
    resources_per_trial: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 1.0},
        description="Ray resources of an in-process trial, e.g. {CPU: 2, GPU: 0.25} (fractional GPUs allowed).",
    )
    max_failures: int = Field(
        1, ge=0, le=1000, description="Retries of a trial that crashes (a diverged loss is not retried)."
    )
    guides_first: bool = Field(
        True,
        description="Train the guides every trial needs (the teacher) before the trials, with all trial slots' "
        "resources; false: the first trial that needs one trains it while the others wait.",
    )
    reuse_actors: bool = Field(
        True,
        description="Run the next in-process trial in a finished (or stopped) trial's process instead of a new one: "
        "saves the ~10 s a fresh process spends starting and importing; false: a new process per trial. "
        "Trials on Ray Train worker groups always get a new process.",
    )
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    references: list[str] = Field(
        default_factory=lambda: ["none", "kd"],
        description="Methods also trained at their defaults with the same budget, to compare with (true = none "
        "and kd, the student alone and default KD; false or [] = none).",
    )
    space: dict[str, SearchParam] = Field(default_factory=dict, description="Dotted config field -> range.")
    register_model: bool = Field(
        True, description="Register the best trial's student in the MLflow Model Registry as <experiment>-student."
    )

    @field_validator("references", mode="before")
    @classmethod
    def _references_switch(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return ["none", "kd"] if value else []
        return value

    @field_validator("metric")
    @classmethod
    def _validation_metric(cls, metric: str) -> str:
        if not metric.startswith("val/"):
            raise ValueError(f"'{metric}': use a validation metric such as val/acc or val/loss (test/* never selects)")
        return metric
