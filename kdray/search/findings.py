"""What a search found, as data: one row per trial, the report over them, and an Optuna study of the rows.

Beneath both the report (``kdray.search.report``, which reads the rows from MLflow and writes the summary)
and the plots (``kdray.search.plots``, which draw them), so each imports this and neither the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from kdray.schema import ExperimentConfig, SearchParam
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
    study = optuna.create_study(
        storage=storage, study_name=name, direction="maximize" if report.mode == "max" else "minimize"
    )
    for row in report.rows:
        if not math.isfinite(row.value):
            continue
        params: dict[str, Any] = {}
        distributions: dict[str, Any] = {}
        for key, value in row.sampled.items():
            if key not in space:
                continue
            name = "method.name" if key == "method.name" else optuna_name(key, row.method, searched)
            params[name] = value
            distributions[name] = _distribution(space[key])
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=row.value))
    return study


def _distribution(param: SearchParam) -> Any:
    import optuna.distributions as d

    if param.kind == "choice":
        return d.CategoricalDistribution(param.values)
    if param.kind == "int":
        return d.IntDistribution(int(param.low), int(param.high))  # type: ignore[arg-type]
    return d.FloatDistribution(param.low, param.high, log=param.kind == "logfloat")  # type: ignore[arg-type]
