"""The search section: which fields Ray Tune varies, how Optuna samples them and ASHA stops trials. Which
methods a range or a reference names is the method registry's to say (``kdray.resolve`` checks them)."""

from __future__ import annotations

import re
from typing import Any, Literal, NamedTuple

from pydantic import Field, field_validator, model_validator

from kdray.schema.fields import BATCH_MAX, EPOCHS_MAX, SEED_MAX, WORKERS_MAX, PlainName, Section


class SearchParam(Section):
    kind: Literal["float", "logfloat", "int", "choice"] = Field(description="Distribution of the parameter.")
    low: float | None = Field(None, description="Lower bound (float, logfloat, int).")
    high: float | None = Field(None, description="Upper bound (float, logfloat, int).")
    values: list[Any] | None = Field(None, description="Choices (choice).")
    step: float | None = Field(
        None, gt=0, description="Grid of an int or float range: low, low + step, …, high (e.g. resnet depths: 6)."
    )
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
        if self.step is not None:
            if self.kind not in ("int", "float"):
                raise ValueError(f"step: only int and float ranges take a step, not {self.kind}")
            assert self.low is not None and self.high is not None
            steps = (self.high - self.low) / self.step
            if abs(steps - round(steps)) > 1e-9:
                raise ValueError(f"step: high - low ({self.high - self.low:g}) must be a multiple of {self.step:g}")
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
    name: Literal["tpe", "gp", "random", "nsga2"] = Field(
        "tpe", description="Optuna sampler: TPE (one or several objectives), Gaussian process, random, NSGA-II."
    )
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Sampler seed: the same search proposes the same trials.")


# What a student costs, measured once per architecture on the machine that trains it (kdray.cost): objectives and
# constraints may name these beside the val/* metrics.
COST_METRICS = ("params", "macs", "latency_ms", "throughput")
_CONSTRAINT = re.compile(r"\s*(?P<metric>[\w/.]+)\s*(?P<op><=|>=)\s*(?P<bound>[-+0-9.eE]+)\s*")


class Objective(Section):
    metric: str = Field(description="A val/* metric of the final student, or a cost: " + ", ".join(COST_METRICS))
    mode: Literal["max", "min"] = Field(description="Maximise or minimise it.")

    @field_validator("metric")
    @classmethod
    def _known(cls, metric: str) -> str:
        if not metric.startswith("val/") and metric not in COST_METRICS:
            raise ValueError(f"'{metric}': a val/* metric or one of {', '.join(COST_METRICS)}")
        return metric


class Constraint(NamedTuple):
    """``metric <= bound`` or ``metric >= bound``: a trial that breaks it is never on the front."""

    metric: str
    op: str
    bound: float

    @property
    def text(self) -> str:
        """``metric <= bound``: the constraint's name in Optuna and in reports."""
        return f"{self.metric} {self.op} {self.bound:g}"

    def excess(self, value: float) -> float:
        """How far ``value`` breaks the constraint (≤ 0: it holds), Optuna's convention for constraints."""
        return value - self.bound if self.op == "<=" else self.bound - value


def parse_constraint(text: str) -> Constraint:
    found = _CONSTRAINT.fullmatch(text)
    if found is None:
        raise ValueError(f"'{text}': write METRIC <= NUMBER or METRIC >= NUMBER (e.g. latency_ms <= 5)")
    metric = found["metric"]
    if not metric.startswith("val/") and metric not in COST_METRICS:
        raise ValueError(f"'{text}': {metric} is not a val/* metric or one of {', '.join(COST_METRICS)}")
    try:
        return Constraint(metric, found["op"], float(found["bound"]))
    except ValueError:
        raise ValueError(f"'{text}': {found['bound']} is not a number") from None


class CostConfig(Section):
    batch: int = Field(64, ge=1, le=BATCH_MAX, description="The throughput batch (latency is also measured at 1).")
    threads: int = Field(1, ge=1, le=WORKERS_MAX, description="CPU threads the exported student runs on.")
    repeats: int = Field(30, ge=3, le=100_000, description="Timed runs per batch size (the median is reported).")
    warmup: int = Field(5, ge=1, le=100_000, description="Runs before the timed ones, not counted.")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Measure on a named Ray resource (e.g. {latency_target: 1}, a node offering it) instead of the "
        "trial's own machine.",
    )


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
    objectives: list[Objective] = Field(
        default_factory=list,
        description="Several objectives (e.g. [{metric: val/acc, mode: max}, {metric: latency_ms, mode: min}]): the "
        "search gives back their Pareto front; the first must be a val/* metric and replaces metric/mode.",
    )
    constraints: list[str] = Field(
        default_factory=list, description="Bounds a front member must meet: ['latency_ms <= 5', 'params <= 1e6']."
    )
    cost: CostConfig = Field(default_factory=CostConfig)

    @property
    def parsed_constraints(self) -> list[Constraint]:
        return [parse_constraint(text) for text in self.constraints]

    @property
    def measures_cost(self) -> bool:
        """Whether trials measure their student's cost: an objective or a constraint names one."""
        named = [o.metric for o in self.objectives] + [c.metric for c in self.parsed_constraints]
        return any(metric in COST_METRICS for metric in named)

    @field_validator("constraints")
    @classmethod
    def _constraints(cls, constraints: list[str]) -> list[str]:
        for text in constraints:
            parse_constraint(text)
        return constraints

    @model_validator(mode="after")
    def _first_objective_ranks(self) -> SearchConfig:
        if not self.objectives:
            return self
        if len(self.objectives) == 1:
            raise ValueError("objectives: give two or more (one objective is metric and mode)")
        first = self.objectives[0]
        if not first.metric.startswith("val/"):
            raise ValueError(f"objectives: the first ranks the trials and must be a val/* metric, not {first.metric}")
        if len({o.metric for o in self.objectives}) < len(self.objectives):
            raise ValueError("objectives: each metric once")
        if "metric" in self.model_fields_set and self.metric != first.metric:
            raise ValueError(f"metric: {self.metric} is not the first objective ({first.metric}); leave metric out")
        object.__setattr__(self, "metric", first.metric)
        object.__setattr__(self, "mode", first.mode)
        return self

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
