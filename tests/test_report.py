"""The search report's comparisons: at equal budget, and plain about a search that does not pay off."""

from __future__ import annotations

from kdray.resolve import load_config
from kdray.search.findings import SearchReport, TrialRow
from kdray.search.report import render_markdown


def row(name: str, value: float, epochs: int, status: str = "FINISHED") -> TrialRow:
    return TrialRow(f"run-{name}", name, status, "kd", {"method.temperature": 4.0}, value, epochs)


def report(rows: list[TrialRow], references: dict[str, float]) -> SearchReport:
    counts = {"trials": len(rows), "completed": 0, "stopped": 0, "failed": 0, "models_trained": 0, "models_reused": 1}
    counts["models_trained_first"] = 1
    return SearchReport("val/acc", "max", rows, references, counts)


def test_the_best_ran_the_whole_budget_and_the_report_says_when_it_loses() -> None:
    # the early-stopped trial's 0.99 was measured after 1 epoch: it is not the best at the references' budget
    rows = [row("stopped", 0.99, 1, "STOPPED"), row("full", 0.90, 3)]
    built = report(rows, {"none": 0.95, "kd": 0.80})
    assert built.best is not None and built.best.name == "full"
    text = render_markdown(built, load_config(None))
    assert "**Best**: full, val/acc = 0.9000 after 3 epochs" in text
    assert (
        "**The best trial does not beat the student trained alone** (val/acc 0.9000 vs 0.9500, 3 epochs each)." in text
    )
    assert "The best trial beats default KD by +0.1000 (val/acc 0.9000 vs 0.8000, 3 epochs each)." in text


def test_no_trial_that_ran_its_budget_means_no_best() -> None:
    built = report([row("stopped", 0.99, 1, "STOPPED")], {"none": 0.5})
    assert built.best is None and "does not beat" not in render_markdown(built, load_config(None))


def test_a_tie_is_called_a_tie() -> None:
    text = render_markdown(report([row("full", 0.95, 3)], {"none": 0.95}), load_config(None))
    assert "**The best trial only ties the student trained alone** (val/acc 0.9500 vs 0.9500, 3 epochs each)." in text
