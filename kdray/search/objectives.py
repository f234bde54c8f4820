"""Several objectives and constraints through Optuna's own machinery, under Ray Tune's ``OptunaSearch``.

A trial reports its student's val/* metrics to Tune every epoch; its cost (params, MACs, latency, throughput)
it logs to its MLflow run before training (``kdray.search.trial.log_cost``), on whichever node it ran and on
both training routes (in process, or a Ray Train worker group whose reports Tune hears from the chief). When a
trial completes, ``ObjectiveSearch`` reads that cost back from the run and merges it into the trial's final
result before Optuna is told: Optuna then sees every objective, and each constraint's excess (``value - bound``,
≤ 0 when it holds) through ``Trial.set_constraint``, which Optuna's samplers read (TPE, NSGA-II and GP prefer
feasible trials).

ASHA compares trials on one metric at equal epochs: with several objectives it would stop a small student for its
accuracy at an early rung although its latency could put it on the front, so it is refused
(``kdray.search.space.check_space``).
"""

from __future__ import annotations

import os
from typing import Any

from ray.tune.search.optuna import OptunaSearch

from kdray.schema import COST_METRICS, Constraint, ExperimentConfig
from kdray.search.unrecorded import runs_of_trial
from kdray.tracking import Tracker


def allow_metrics_at_completion(cfg: ExperimentConfig) -> None:
    """Tune checks that every result of a trial holds each of the searcher's metrics. A trial's cost is not in its
    per-epoch results: ``ObjectiveSearch`` merges it from the trial's run when the trial completes. So a search
    with several objectives turns that check off in the driver (Tune reads the variable at every result)."""
    if cfg.search.objectives:
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"


class ObjectiveSearch(OptunaSearch):
    """``OptunaSearch`` whose trials' final results gain the cost metrics their MLflow runs hold, and whose Optuna
    trials carry their constraints' excess, before Optuna is told the result."""

    def __init__(self, *, uri: str, experiment: str, parent: str, constraints: list[Constraint], **kwargs: Any):
        super().__init__(**kwargs)
        self.uri = uri
        self.experiment = experiment
        self.parent = parent
        self.constraints = constraints

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result is not None and trial_id in self._ot_trials:
            result = {**self._costs(trial_id), **result}
            for constraint in self.constraints:  # a metric the trial never reported breaks its constraint
                excess = constraint.excess(result[constraint.metric]) if constraint.metric in result else 1.0
                self._ot_trials[trial_id].set_constraint(constraint.text, excess)
        super().on_trial_complete(trial_id, result, error)

    def _costs(self, trial_id: str) -> dict[str, float]:
        runs = runs_of_trial(Tracker(self.uri, self.experiment), self.parent, trial_id)
        if not runs:
            return {}
        return {name: value for name, value in runs[0].data.metrics.items() if name in COST_METRICS}
