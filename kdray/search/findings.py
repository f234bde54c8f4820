"""What a search found, as data: one row per trial, the report over them, and an Optuna study of the rows.

Beneath both the report (``kdray.search.report``, which reads the rows from MLflow and writes the summary)
and the plots (``kdray.search.plots``, which draw them), so each imports this and neither the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from kdray.schema import Constraint, ExperimentConfig, SearchParam
from kdray.schema.search import Objective
from kdray.search.space import optuna_name

REFERENCE_NAMES = {"none": "student alone", "kd": "default KD"}  # the baselines a search trains (references)


@dataclass
class TrialRow:
    run_id: str
    name: str
    status: str
    method: str
    sampled: dict[str, Any]
    value: float  # the search metric at the trial's last epoch (nan if none)
    epochs: int
    note: str = ""
    model: str = ""  # the student's architecture (searchable with student.name/depth/width)
    values: dict[str, float] = field(default_factory=dict)  # its last val/* metrics and its cost (kdray.cost)


@dataclass
class SearchReport:
    metric: str
    mode: str
    rows: list[TrialRow]
    references: dict[str, float]
    counts: dict[str, int]
    timing: dict[str, float] = field(default_factory=dict)  # the search run's search/* metrics (utilisation)
    markdown: str = ""
    plots: dict[str, bytes] = field(default_factory=dict)
    objectives: list[Objective] = field(default_factory=list)  # several: the search gives back a Pareto front
    constraints: list[Constraint] = field(default_factory=list)
    front: list[str] = field(default_factory=list)  # run ids of the trials on it, best first by the first objective
    reference_points: list[dict[str, Any]] = field(default_factory=list)  # per front architecture: method, values

    def point(self, row: TrialRow) -> dict[str, float]:
        """The row's values of every metric an objective or constraint can name."""
        return {**row.values, self.metric: row.value}

    @property
    def ranked(self) -> list[TrialRow]:
        scored = [row for row in self.rows if math.isfinite(row.value)]
        return sorted(scored, key=lambda row: row.value, reverse=self.mode == "max")

    @property
    def best(self) -> TrialRow | None:
        """The best trial that ran its whole budget (a trial stopped early scored at fewer epochs than the
        references it is compared with, and stored no student)."""
        return next((row for row in self.ranked if row.status == "FINISHED"), None)


def study_of(report: SearchReport, cfg: ExperimentConfig, storage: Any = None, name: str | None = None) -> Any:
    """An Optuna study holding the scored trials: in memory for Optuna's plots, or in ``storage`` as ``name``."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "a new study created in memory" at every report
    space = cfg.search.space
    searched = "method.name" in space
    objectives = report.objectives or [Objective(metric=report.metric, mode=report.mode)]
    directions = ["maximize" if o.mode == "max" else "minimize" for o in objectives]
    study = optuna.create_study(storage=storage, study_name=name, directions=directions)
    for row in report.rows:
        values = [report.point(row).get(o.metric, math.nan) for o in objectives]
        if not all(math.isfinite(v) for v in values) or (report.objectives and row.status != "FINISHED"):
            continue
        params: dict[str, Any] = {}
        distributions: dict[str, Any] = {}
        for key, value in row.sampled.items():
            if key not in space:
                continue
            name = "method.name" if key == "method.name" else optuna_name(key, row.method, searched)
            params[name] = value
            distributions[name] = _distribution(space[key])
        # with its constraints, so that study.best_trials is the feasible front, the report's
        excess = {c.text: c.excess(report.point(row).get(c.metric, math.inf)) for c in report.constraints}
        study.add_trial(
            optuna.trial.create_trial(
                params=params, distributions=distributions, values=values, constraints=excess or None,
                user_attrs={"run_id": row.run_id},
            )
        )  # fmt: skip
    return study


def _distribution(param: SearchParam) -> Any:
    import optuna.distributions as d

    if param.kind == "choice":
        return d.CategoricalDistribution(param.values)
    if param.kind == "int":
        return d.IntDistribution(int(param.low), int(param.high), step=int(param.step or 1))  # type: ignore[arg-type]
    return d.FloatDistribution(param.low, param.high, log=param.kind == "logfloat", step=param.step)  # type: ignore[arg-type]
