"""What a search found, read back from MLflow: a markdown summary and Optuna's plots.

Everything comes from the MLflow runs (the search run, its trial runs and reference runs), so
``kdray report NAME`` rebuilds the same table and plots long after the Ray session is gone. The
plots use Optuna's matplotlib visualisations on a study rebuilt from the trials' sampled values.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import yaml

from kdray import tag_names as tag
from kdray.resolve import validate_config
from kdray.schema import COST_METRICS, ConfigError, ExperimentConfig
from kdray.search.findings import REFERENCE_NAMES, SearchReport, TrialRow
from kdray.search.pareto import front
from kdray.search.plots import figures, to_png
from kdray.search.space import default_points
from kdray.tracking import Tracker, download_text, find_search_run
from kdray.ui import existing_store

log = logging.getLogger(__name__)


WINNER_MARK = "★ best: "  # prefixed to the winning trial's run name: the runs table shows it without extra columns
STATUS_WORDS = {"FINISHED": "done", "STOPPED": "stopped early", "FAILED": "failed", "KILLED": "killed"}


def trial_status(mlflow_status: str, tags: dict[str, str]) -> str:
    """FINISHED (ran its whole budget), STOPPED (the scheduler ended it early: a FINISHED run tagged
    ``kdray.stopped``; KILLED in stores written before kdray ended them FINISHED), FAILED, KILLED, RUNNING."""
    return "STOPPED" if tag.STOPPED in tags else mlflow_status


def collect(tracking: Tracker, parent: str, metric: str) -> list[TrialRow]:
    rows = []
    for run in tracking.runs_under(parent, role="trial"):
        history = tracking.metric_history(run.info.run_id, metric)
        tags = run.data.tags
        values = {k: v for k, v in run.data.metrics.items() if k.startswith("val/") or k in COST_METRICS}
        rows.append(
            TrialRow(
                run_id=run.info.run_id,
                name=run.info.run_name.removeprefix(WINNER_MARK),
                status=trial_status(run.info.status, tags),
                method=tags.get("method", ""),
                sampled=json.loads(tags.get(tag.SAMPLED, "{}")),
                value=history[-1].value if history else math.nan,
                epochs=history[-1].step if history else 0,
                note=tags.get(tag.STOPPED) or tags.get(tag.ERROR, ""),
                model=run.data.params.get("student.name", ""),
                values=values,
            )
        )
    return rows


def rendered(report: SearchReport, cfg: ExperimentConfig) -> SearchReport:
    """``report`` with its markdown and plots drawn (``gather_report`` leaves them out)."""
    report.markdown = render_markdown(report, cfg)
    report.plots = to_png(figures(report, cfg))
    return report


def gather_report(
    tracking: Tracker,
    parent: str,
    cfg: ExperimentConfig,
    references: dict[str, float] | None = None,
    reference_points: list[dict[str, Any]] | None = None,
) -> SearchReport:
    """The report's rows, counts and (with objectives) front, not yet rendered (``rendered``): the driver needs
    the front to know which architectures to train references for before it draws anything. ``None``
    references are read from the tracking store (``kdray report``)."""
    search = cfg.search
    rows = collect(tracking, parent, search.metric)
    if references is None and search.objectives:  # `kdray report`: the references are per front architecture
        references = {}
    if references is None:  # `kdray report`: read them from the reference runs
        references = {}
        for run in tracking.runs_under(parent, role="reference"):
            students = tracking.runs_under(run.info.run_id, role="student")
            if students:
                references[run.data.tags.get("method", "?")] = students[-1].data.metrics.get(search.metric, math.nan)
    statuses = [row.status for row in rows]
    counts = {
        "trials": len(rows),
        "completed": statuses.count("FINISHED"),
        "stopped": statuses.count("STOPPED"),
        "failed": statuses.count("FAILED") + statuses.count("KILLED"),
    }
    trial_runs = {run.info.run_id: run for run in tracking.runs_under(parent, role="trial")}
    counts["models_trained"] = sum(int(r.data.tags.get(tag.MODELS_TRAINED, 0)) for r in trial_runs.values())
    counts["models_reused"] = sum(int(r.data.tags.get(tag.MODELS_REUSED, 0)) for r in trial_runs.values())
    shared = [run for run in tracking.runs_under(parent) if run.data.tags.get(tag.SHARED_GUIDE) == "true"]
    counts["models_trained_first"] = sum(run.data.tags.get(tag.REUSED) == "false" for run in shared)
    timing = {k: v for k, v in tracking.latest_metrics(parent).items() if k.startswith("search/")}
    report = SearchReport(search.metric, search.mode, rows, references, counts, timing)
    if search.objectives:
        report.objectives, report.constraints = list(search.objectives), search.parsed_constraints
        finished = {row.run_id: report.point(row) for row in report.ranked if row.status == "FINISHED"}
        report.front = front(finished, report.objectives, report.constraints)
        report.reference_points = (
            reference_points if reference_points is not None else _reference_points(tracking, parent)
        )
    return report


def _reference_points(tracking: Tracker, parent: str) -> list[dict[str, Any]]:
    """The references trained per front architecture (``kdray report``): method, architecture and values."""
    points = []
    for run in tracking.runs_under(parent, role="reference"):
        students = tracking.runs_under(run.info.run_id, role="student")
        if students and run.data.tags.get(tag.PARETO_MODEL):
            values = {k: v for k, v in students[-1].data.metrics.items() if k.startswith("val/")}
            values |= {k: v for k, v in run.data.metrics.items() if k in COST_METRICS}
            points.append({"method": run.data.tags.get("method", "?"), "model": run.data.tags[tag.PARETO_MODEL],
                           "values": values})  # fmt: skip
    return points


def front_markdown(report: SearchReport) -> list[str]:
    """The Pareto front as a table (architecture, method and values, every objective, the cost), what it leaves
    out, and how far distillation moved it: each front architecture's references at the same budget."""
    objectives = [o.metric for o in report.objectives]
    shown = list(dict.fromkeys([*objectives, *(m for m in ("params", "macs", "latency_ms") if m not in objectives)]))
    bounds = ", ".join(c.text for c in report.constraints) or "none"
    rows = {row.run_id: row for row in report.rows}
    lines = [
        f"## Pareto front: {' vs '.join(f'{o.metric} ({o.mode})' for o in report.objectives)}",
        "",
        f"Constraints: {bounds}. {len(report.front)} trials on the front; every other finished trial is dominated "
        "or breaks a constraint (tagged `kdray.pareto=false`).",
        "",
        "| trial | architecture | method | sampled | " + " | ".join(shown) + " |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in shown) + " |",
    ]
    for run_id in report.front:
        row = rows[run_id]
        point = report.point(row)
        sampled = ", ".join(f"{k}={_short(v)}" for k, v in row.sampled.items() if k != "method.name")
        cells = [_cell(metric, point.get(metric, math.nan)) for metric in shown]
        lines.append(f"| {row.name} | {row.model} | {row.method} | {sampled} | " + " | ".join(cells) + " |")
    if report.reference_points:
        lines += ["", "References on the front's architectures (same budget):", "",
                  "| architecture | reference | " + " | ".join(shown) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in shown) + " |"]  # fmt: skip
        for point in report.reference_points:
            label = REFERENCE_NAMES.get(point["method"], point["method"])
            cells = [_cell(metric, point["values"].get(metric, math.nan)) for metric in shown]
            lines.append(f"| {point['model']} | {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def render_markdown(report: SearchReport, cfg: ExperimentConfig) -> str:
    metric = report.metric
    lines = [f"# Search report: {metric} ({report.mode})", ""]
    best = report.best
    if best is not None:
        lines += [f"**Best**: {best.name}, {metric} = {best.value:.4f} after {best.epochs} epochs", ""]
        lines += ["```yaml", *(f"{k}: {v}" for k, v in {"method.name": best.method, **best.sampled}.items()), "```", ""]
    # The first trial of each method is its default point (points_to_evaluate are evaluated first), where it has one
    # (a default outside the searched range, or a searched field without a default, has none).
    with_defaults = {point.get("method.name", cfg.method.name) for point in default_points(cfg)}
    defaults: dict[str, TrialRow] = {}
    for row in report.rows:
        if row.method in with_defaults:
            defaults.setdefault(row.method, row)
    comparison = ["| reference | " + metric + " | best − reference |", "| --- | --- | --- |"]
    for method, row in defaults.items():
        comparison.append(_versus(f"defaults of {method}: {row.name}, {row.epochs} epochs", row.value, best))
    for method, value in report.references.items():
        label = REFERENCE_NAMES.get(method, f"{method} at its defaults")
        comparison.append(_versus(f"{label}, same budget", value, best))
    lines += comparison + [""]
    lines += _verdicts(report) + [""] if best is not None and report.references else []
    lines += front_markdown(report) if report.objectives else []
    lines += [
        "| rank | trial | method | sampled | " + metric + " | epochs | status |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    ranked = report.ranked
    unranked = [row for row in report.rows if row not in ranked]
    for position, row in enumerate(ranked + unranked, start=1):
        sampled = ", ".join(f"{k}={_short(v)}" for k, v in row.sampled.items() if k != "method.name")
        status = STATUS_WORDS.get(row.status, row.status.lower()) + (f": {row.note}" if row.note else "")
        value = f"{row.value:.4f}" if math.isfinite(row.value) else "-"
        rank = str(position) if row in ranked else "-"
        lines.append(f"| {rank} | {row.name} | {row.method} | {sampled} | {value} | {row.epochs} | {status} |")
    counts = report.counts
    lines += [
        "",
        f"Trials: {counts['trials']} ({counts['completed']} completed, {counts['stopped']} stopped early, "
        f"{counts['failed']} failed). Guide models (teachers, assistants, pacemakers): "
        f"{counts['models_trained_first']} trained before the trials (shared by all), {counts['models_trained']} "
        f"trained by trials, {counts['models_reused']} reused from the model store.",
    ]
    timing = report.timing
    if "search/utilisation" in timing:
        lines += [
            "",
            f"Time: trials spent {timing['search/utilisation']:.0%} of their slots' time training "
            f"({timing['search/trials_train_s']:.0f} s of training epochs in {timing['search/trials_wall_s']:.0f} s "
            f"× {timing['search/slots']:.0f} slots; the rest is per-trial start-up, data, evaluation and idle slots)"
            + (
                f"; shared guides trained first in {timing['search/shared_guides_s']:.0f} s."
                if timing.get("search/shared_guides_s")
                else "."
            ),
        ]
    return "\n".join(lines) + "\n"


def _verdicts(report: SearchReport) -> list[str]:
    """One plain sentence per reference: does the best trial beat it, at the same budget?"""
    best = report.best
    assert best is not None
    sentences = []
    for method, value in report.references.items():
        if not math.isfinite(value):
            continue
        label = "the student trained alone" if method == "none" else REFERENCE_NAMES.get(method, f"{method} defaults")
        better = best.value > value if report.mode == "max" else best.value < value
        numbers = f"{report.metric} {best.value:.4f} vs {value:.4f}, {best.epochs} epochs each"
        if better:
            sentences.append(f"The best trial beats {label} by {best.value - value:+.4f} ({numbers}).")
        elif best.value == value:
            sentences.append(f"**The best trial only ties {label}** ({numbers}).")
        else:
            sentences.append(f"**The best trial does not beat {label}** ({numbers}).")
    return sentences


def _versus(label: str, value: float, best: TrialRow | None) -> str:
    if not math.isfinite(value):
        return f"| {label} | - | - |"
    gain = f"{best.value - value:+.4f}" if best is not None else "-"
    return f"| {label} | {value:.4f} | {gain} |"


def _cell(metric: str, value: float) -> str:
    """A front table's cell: counts whole with thousands separators, milliseconds to the microsecond."""
    if not math.isfinite(value):
        return "-"
    if metric in ("params", "macs", "throughput"):
        return f"{value:,.0f}"
    return f"{value:.3f}" if metric.endswith("_ms") else f"{value:.4f}"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def publish(tracking: Tracker, parent: str, report: SearchReport) -> None:
    """The report on the search run: summary.md, the plots, counts and the best value as metrics."""
    tracking.log_text(parent, report.markdown, "summary.md")
    with tempfile.TemporaryDirectory() as folder:
        for name, png in report.plots.items():
            path = Path(folder) / f"{name}.png"
            path.write_bytes(png)
            tracking.log_artifact(parent, path, "plots")
    metrics = {
        f"trials_{k}" if k in ("completed", "stopped", "failed") else k: float(v) for k, v in report.counts.items()
    }
    if report.best is not None:
        best = report.best
        # under the metric's own name too: the runs table's val/acc column then ranks searches beside experiments
        metrics[f"best/{report.metric}"] = metrics[report.metric] = best.value
        link = f"[{best.name}](#/experiments/{tracking.experiment_id}/runs/{best.run_id})"
        values = {"method.name": best.method, **best.sampled}
        tracking.set_tags(
            parent,
            {
                tag.BEST_TRIAL: best.name,
                tag.BEST_RUN_ID: best.run_id,
                tag.BEST_CONFIG: json.dumps(values),
                **{f"best.{key}": str(value) for key, value in values.items()},  # sortable columns in the runs table
                # the run's description in MLflow's UI: the winner, one click away
                tag.NOTE: f"Best trial: {link} ({best.method}), {report.metric} = {best.value:.4f}",
            },
        )
    mark_winner(tracking, report)
    if report.objectives:
        for row in report.rows:
            if row.status == "FINISHED" and math.isfinite(row.value):
                tracking.set_tags(row.run_id, {tag.PARETO: str(row.run_id in report.front).lower()})
        metrics["pareto/points"] = float(len(report.front))
    for method, value in report.references.items():
        if math.isfinite(value):
            metrics[f"reference_{method}/{report.metric}"] = value
    tracking.log_metrics(parent, metrics, step=0)


def mark_winner(tracking: Tracker, report: SearchReport) -> None:
    """Tag the best trial ``kdray.winner`` and prefix its run name with WINNER_MARK; a search resumed and
    published again moves both from an earlier winner."""
    best = report.best
    for row in report.rows:
        won = best is not None and row.run_id == best.run_id
        tracking.rename(row.run_id, WINNER_MARK + row.name if won else row.name)
        if won:
            tracking.set_tags(row.run_id, {tag.WINNER: "true"})
        else:
            tracking.delete_tag(row.run_id, tag.WINNER)


def report_by_name(name: str, tracking_uri: str | None) -> SearchReport:
    """``kdray report NAME``: find the search run in any experiment of the store and rebuild its report."""

    uri = existing_store(tracking_uri)
    found = find_search_run(uri, name)
    if found is None:
        raise ConfigError(f"no search called '{name}' in the MLflow store {uri} (give --tracking-uri?)")
    run, experiment = found
    cfg = validate_config(yaml.safe_load(download_text(uri, run.info.run_id, "config.yaml")))
    return rendered(gather_report(Tracker(uri, experiment), run.info.run_id, cfg), cfg)
