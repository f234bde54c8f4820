"""The search's plots, drawn with matplotlib from the report's rows and saved as PNGs on the search run.

kdray draws them itself rather than through Optuna's matplotlib views: those lay one slice panel per
parameter side by side at a fixed width (labels overlap past three or four), switch matplotlib's
global style, and rate parameters only over the trials that share all of them, so with ``method.name``
searched the method (which is what separates the trials) scored below 0.01. Here:

- ``optimization_history``: every scored trial in start order, the best-so-far line over the trials
  that ran their whole budget, and the references as dashed lines;
- ``methods`` (when the method is searched): each method's trials side by side, in place of an
  importance plot, with the references;
- ``param_importances`` (one method, two or more parameters): Optuna's importance evaluator over the
  trials that ran their whole budget;
- ``metric_vs_params``: one panel per parameter that took two or more values, wrapped three to a row;
- ``chain_depth``: the metric against ``assistants.depth`` when the search tried two depths or more.

Trials stopped early are drawn hollow: they scored at fewer epochs. A plot with fewer than two points
is not drawn.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdray.schema import ExperimentConfig
from kdray.search.findings import REFERENCE_NAMES, SearchReport, TrialRow, study_of

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


PANEL_IN = (4.2, 3.4)  # width, height of one panel in inches (saved at 100 dpi)
COLUMNS = 3
REFERENCE_STYLE = {"none": ":", "kd": "--"}


def figures(report: SearchReport, cfg: ExperimentConfig) -> dict[str, Figure]:
    """The plots worth drawing for this search, by name (the PNG's file name without ``.png``)."""
    scored = [row for row in report.rows if math.isfinite(row.value)]
    if len(scored) < 2:
        return {}
    drawn: dict[str, Figure] = {"optimization_history": _history(report, scored)}
    methods = sorted({row.method for row in scored})
    if len(methods) > 1:
        drawn["methods"] = _methods(report, scored, methods)
    else:
        importances = _importances(report, cfg)
        if importances is not None:
            drawn["param_importances"] = importances
    varied = [key for key in cfg.search.space if key != "method.name" and len(_values(scored, key)) > 1]
    if varied:
        drawn["metric_vs_params"] = _panels(report, scored, varied, cfg)
    if "assistants.depth" in varied:
        drawn["chain_depth"] = _panels(report, scored, ["assistants.depth"], cfg)
    if report.objectives:
        drawn["pareto_front"] = _front(report)
    return drawn


def _front(report: SearchReport) -> Figure:
    """The first objective against the second: every finished trial (grey: dominated or infeasible), the front
    as a step line through its members, and the references of the front's architectures as labelled points."""
    first, second = report.objectives[0], report.objectives[1]
    figure, (axes,) = _new_figure()
    finished = [row for row in report.rows if row.status == "FINISHED" and math.isfinite(row.value)]
    on_front = [row for row in finished if row.run_id in report.front]
    off = [row for row in finished if row.run_id not in report.front]
    for rows, color, label in ((off, "lightgrey", "dominated or infeasible"), (on_front, "tab:red", "front")):
        points = [(report.point(row).get(second.metric, math.nan), row.value) for row in rows]
        axes.scatter([x for x, _ in points], [y for _, y in points], s=36, color=color, label=label, zorder=2)
    line = sorted((report.point(row).get(second.metric, math.nan), row.value) for row in on_front)
    if len(line) > 1:
        axes.step([x for x, _ in line], [y for _, y in line], where="post", color="tab:red", linewidth=1)
    for point in report.reference_points:
        x, y = point["values"].get(second.metric, math.nan), point["values"].get(first.metric, math.nan)
        marker = "s" if point["method"] == "none" else "^"
        axes.scatter([x], [y], marker=marker, color="black", s=30, zorder=3)
        axes.annotate(f"{REFERENCE_NAMES.get(point['method'], point['method'])}, {point['model']}", (x, y),
                      fontsize=7, xytext=(3, 3), textcoords="offset points")  # fmt: skip
    axes.set_xlabel(f"{second.metric} ({second.mode})")
    axes.set_ylabel(f"{first.metric} ({first.mode})")
    axes.set_title("Pareto front")
    axes.legend(fontsize=8)
    return figure


def to_png(drawn: dict[str, Figure]) -> dict[str, bytes]:
    """Each figure's PNG bytes, at the size it was laid out for; the figures are closed."""
    import matplotlib.pyplot as plt

    pngs = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, figure in drawn.items():
            path = Path(folder) / f"{name}.png"
            figure.savefig(path, dpi=100)
            pngs[name] = path.read_bytes()
            plt.close(figure)
    return pngs


def _new_figure(panels: int = 1) -> tuple[Figure, list[Axes]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(COLUMNS, panels)
    rows = math.ceil(panels / columns)
    size = (max(6.4, PANEL_IN[0] * columns), PANEL_IN[1] * rows + (0.6 if panels == 1 else 0))
    figure, axes = plt.subplots(rows, columns, figsize=size, layout="constrained", squeeze=False)
    flat = list(axes.flat)
    for spare in flat[panels:]:
        spare.remove()
    return figure, flat[:panels]


def _scatter(axes: Axes, xs: list[Any], rows: list[TrialRow], color: str, label: str | None) -> None:
    """Filled markers for trials that ran their budget, hollow ones for trials stopped early."""
    for stopped in (False, True):
        chosen = [(x, row.value) for x, row in zip(xs, rows, strict=True) if (row.status != "FINISHED") == stopped]
        if chosen:
            axes.scatter(
                [x for x, _ in chosen],
                [y for _, y in chosen],
                s=36,
                facecolors="none" if stopped else color,
                edgecolors=color,
                label=None if label is None else f"{label}{' (stopped early)' if stopped else ''}",
            )


def _references(axes: Axes, report: SearchReport) -> None:

    for method, value in report.references.items():
        if math.isfinite(value):
            style = REFERENCE_STYLE.get(method, "-.")
            label = f"reference: {REFERENCE_NAMES.get(method, method)}"
            axes.axhline(value, color="grey", linestyle=style, linewidth=1, label=label)


def _history(report: SearchReport, scored: list[TrialRow]) -> Figure:
    figure, (axes,) = _new_figure()
    order = list(range(1, len(scored) + 1))
    _scatter(axes, order, scored, "tab:blue", "trial")
    better: Callable[[float, float], bool] = (lambda a, b: a > b) if report.mode == "max" else (lambda a, b: a < b)
    best, line = math.nan, []
    for row in scored:
        if row.status == "FINISHED" and (math.isnan(best) or better(row.value, best)):
            best = row.value
        line.append(best)
    axes.step(order, line, where="post", color="tab:red", label="best that ran its budget")
    _references(axes, report)
    axes.set(xlabel="trial (in start order)", ylabel=report.metric, title="Search history")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.legend(fontsize="small", loc="best")
    return figure


def _methods(report: SearchReport, scored: list[TrialRow], methods: list[str]) -> Figure:
    figure, (axes,) = _new_figure()
    for position, method in enumerate(methods):
        rows = [row for row in scored if row.method == method]
        offsets = [i / (len(rows) - 1) - 0.5 for i in range(len(rows))] if len(rows) > 1 else [0.0]
        _scatter(axes, [position + 0.25 * offset for offset in offsets], rows, "tab:blue", None)
    _references(axes, report)
    axes.set_xticks(range(len(methods)), methods)
    axes.set(xlabel="method (hollow: stopped early)", ylabel=report.metric, title="Trials by method")
    if report.references:
        axes.legend(fontsize="small", loc="best")
    return figure


def _importances(report: SearchReport, cfg: ExperimentConfig) -> Figure | None:
    """Optuna's importances over the trials that ran their whole budget, when there are parameters to rank."""
    import warnings

    import optuna

    finished = type(report)(report.metric, report.mode, [r for r in report.rows if r.status == "FINISHED"], {}, {})
    study = study_of(finished, cfg)
    names = {name for trial in study.trials for name in trial.params}
    if len(names) < 2 or len(study.trials) < 3:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # evaluators may warn on tiny studies
        ranked = optuna.importance.get_param_importances(study)
    figure, (axes,) = _new_figure()
    keys = list(reversed(ranked))
    axes.barh(keys, [ranked[key] for key in keys], color="tab:blue")
    axes.set(xlabel=f"importance for {report.metric}", title="Parameter importances (trials that ran their budget)")
    return figure


def _values(rows: list[TrialRow], key: str) -> set[Any]:
    return {row.sampled[key] for row in rows if key in row.sampled}


def _panels(report: SearchReport, scored: list[TrialRow], keys: list[str], cfg: ExperimentConfig) -> Figure:
    """The metric against each parameter, one panel each; one colour per method."""
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab10")
    methods = sorted({row.method for row in scored})
    figure, panels = _new_figure(len(keys))
    for axes, key in zip(panels, keys, strict=True):
        kind = cfg.search.space[key].kind
        for index, method in enumerate(methods):
            rows = [row for row in scored if row.method == method and key in row.sampled]
            if rows:
                label = method if len(methods) > 1 else None
                _scatter(axes, [row.sampled[key] for row in rows], rows, colours(index), label)
        if kind == "logfloat":  # ticks at 1, 2, 5 x 10^k written plainly (matplotlib's own labels collide)
            from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

            axes.set_xscale("log")
            axes.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            axes.xaxis.set_minor_formatter(NullFormatter())
        if kind == "int":
            axes.xaxis.get_major_locator().set_params(integer=True)
        axes.set(xlabel=key, ylabel=report.metric)
        if len(methods) > 1 and axes is panels[0]:
            axes.legend(fontsize="small", loc="best")
    figure.suptitle(f"{report.metric} by parameter (hollow: stopped early)")
    return figure
