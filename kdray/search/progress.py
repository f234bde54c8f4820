"""Live progress of a search on the driver's stdout: a compact table on every trial event and every few seconds.

Ray Tune's own console output (an experiment box, results folders, TensorBoard hints) is switched off
(``quiet_ray_output``); this Tune callback prints what a kdray user watches instead: each trial's
method and sampled values, epoch of its budget, current metric and status (running, stopped early,
done, failed), the best so far, the time spent and an estimate of the time left. It writes plain text
(no cursor movement or colour), so the same output reads in a terminal and in ``kdray tune | tee log``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from ray.tune import Callback

from kdray.search.space import sampled_text


@dataclass
class TrialLine:
    name: str
    method: str
    sampled: str
    epoch: int = 0
    value: float = math.nan
    status: str = "pending"


@dataclass
class SearchProgress(Callback):
    """Prints the status table on trial start, result (at most every ``every_s``), stop, completion and error,
    and at least every ``heartbeat_s`` while trials run. Tune pickles it with the search as it was when the search
    started, so a resumed search (``kdray tune --resume``) gets it back empty and with the first start's clock:
    ``setup`` restarts the clock and the first step rebuilds the table from the trials Tune restored."""

    name: str
    metric: str
    mode: str
    num_samples: int
    budget: int  # epochs of a trial that is never stopped
    method: str  # the experiment's method (when method.name is not searched)
    every_s: float = 5.0
    heartbeat_s: float = 30.0
    lines: dict[str, TrialLine] = field(default_factory=dict)
    started: float = field(default_factory=time.time)  # wall time: the callback is pickled with the search
    printed: float = field(default_factory=time.time)  # the first heartbeat waits for something to show
    epochs_before: int = 0  # epochs the restored trials had trained before this start: not on this clock
    restored: bool = False  # whether the table holds the trials Tune knew when this start began

    def __post_init__(self) -> None:
        super().__init__()

    # --- Tune's callback hooks ------------------------------------------------------------------------

    def setup(self, **info: Any) -> None:
        """Each start of the search, a resumed one included: the clock starts now, the table is rebuilt."""
        self.started = self.printed = time.time()
        self.lines.clear()
        self.epochs_before, self.restored = 0, False

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self.restored:
            return
        self.restored = True
        for trial in trials:  # none on a fresh start; on a resumed one, each with where it had got to
            line = self._line(trial)
            result = trial.last_result or {}
            line.epoch = int(result.get("epoch", 0))
            line.value = float(result.get(self.metric, math.nan))
            if trial.status == "TERMINATED":
                line.status = "done" if line.epoch >= self.budget else "stopped early"
            elif trial.status == "ERROR":
                line.status = "failed"
        self.epochs_before = sum(line.epoch for line in self.lines.values())

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial).status = "running"
        self.show()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        line = self._line(trial)
        line.epoch = int(result.get("epoch", line.epoch))
        line.value = float(result.get(self.metric, line.value))
        if time.time() - self.printed >= self.every_s:
            self.show()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        line = self._line(trial)
        result = trial.last_result or {}
        line.epoch = int(result.get("epoch", line.epoch))
        line.value = float(result.get(self.metric, line.value))
        line.status = "done" if line.epoch >= self.budget else "stopped early"
        self.show()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial).status = "failed"
        self.show()

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if time.time() - self.printed >= self.heartbeat_s:
            self.show()

    # --- the table -------------------------------------------------------------------------------------

    def _line(self, trial: Any) -> TrialLine:
        if trial.trial_id not in self.lines:
            overrides = dict(trial.config.get("overrides", {}))
            method = str(overrides.get("method.name", self.method))
            sampled = sampled_text(overrides)
            self.lines[trial.trial_id] = TrialLine(trial.trial_id.rsplit("_", 1)[-1], method, sampled or "-")
        return self.lines[trial.trial_id]

    def show(self) -> None:
        self.printed = time.time()
        print(self.render(), flush=True)

    def render(self) -> str:
        """The header (counts, best, elapsed, time left) and one row per trial seen so far."""
        lines = list(self.lines.values())
        counts = {
            status: sum(line.status == status for line in lines)
            for status in ("running", "done", "stopped early", "failed")
        }
        ended = counts["done"] + counts["stopped early"] + counts["failed"]
        scored = [line for line in lines if math.isfinite(line.value)]
        best = (max if self.mode == "max" else min)(scored, key=lambda line: line.value) if scored else None
        elapsed = time.time() - self.started
        header = (
            f"search {self.name}: {ended}/{self.num_samples} trials ended ({counts['done']} done, "
            f"{counts['stopped early']} stopped early, {counts['failed']} failed), {counts['running']} running"
            f" | best {self.metric} "
            + (f"{best.value:.4f} ({best.name})" if best else "-")
            + f" | elapsed {_clock(elapsed)} | left {self._time_left(elapsed)}"
        )
        rows = [f"  {'trial':<8} {'method':<13} {'epoch':>7} {self.metric:>9}  {'status':<13} sampled"]
        rows += [
            f"  {line.name:<8} {line.method:<13} {f'{line.epoch}/{self.budget}':>7} "
            f"{(f'{line.value:.4f}' if math.isfinite(line.value) else '-'):>9}  {line.status:<13} {line.sampled}"
            for line in lines
        ]
        return "\n".join([header, *rows])

    def _time_left(self, elapsed: float) -> str:
        """At most: the epochs still possible at the rate so far (ASHA stops some trials earlier)."""
        done = sum(line.epoch for line in self.lines.values()) - self.epochs_before
        if done <= 0:
            return "?"
        open_epochs = sum(
            self.budget - line.epoch for line in self.lines.values() if line.status in ("running", "pending")
        )
        unseen = max(0, self.num_samples - len(self.lines)) * self.budget
        return "<= " + _clock(elapsed / done * (open_epochs + unseen))


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
