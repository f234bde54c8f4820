"""The search's plots: the ones that mean something are drawn, and every label is readable at the saved size."""

from __future__ import annotations

from pathlib import Path

import pytest
from matplotlib.figure import Figure
from matplotlib.text import Text

from kdray.resolve import load_config
from kdray.search.findings import SearchReport, TrialRow
from kdray.search.plots import figures, to_png

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"


def trial(method: str, value: float, status: str = "FINISHED", **sampled: float) -> TrialRow:
    values = {"method.name": method, **{key.replace("_", "."): v for key, v in sampled.items()}}
    return TrialRow(f"id-{method}-{value}", f"{method} {value}", status, method, values, value, 4)


def methods_search() -> SearchReport:
    """What the quickstart search leaves: four methods, conditional parameters, some trials stopped early."""
    rows = [
        trial("kd", 0.91, method_temperature=4.0),
        trial("triplet", 0.93, method_temperature=4.0, method_margin=5.0),
        trial("stkd", 0.90, method_temperature=4.0, method_alpha=1.0),
        trial("takd", 0.91, method_temperature=4.0, assistants_depth=1),
        trial("triplet", 0.62, "STOPPED", method_temperature=1.37, method_margin=0.74),
        trial("takd", 0.55, "STOPPED", method_temperature=7.21, assistants_depth=0),
        trial("stkd", 0.94, method_temperature=2.05, method_alpha=0.33),
        trial("kd", 0.58, "STOPPED", method_temperature=1.02),
    ]
    return SearchReport("val/acc", "max", rows, {"none": 0.92, "kd": 0.91}, {})


def drawn_texts(figure: Figure) -> list[Text]:
    """Titles, axis labels, legend entries and the tick labels inside each axis's view (matplotlib keeps
    labels for ticks beyond the limits, undrawn)."""
    texts = list(figure.texts)  # the suptitle among them
    for axes in figure.axes:
        texts += [axes.title, axes.xaxis.label, axes.yaxis.label]
        legend = axes.get_legend()
        texts += list(legend.get_texts()) if legend else []
        for axis in (axes.xaxis, axes.yaxis):
            low, high = sorted(axis.get_view_interval())
            ticks = axis.get_major_ticks() + axis.get_minor_ticks()
            texts += [tick.label1 for tick in ticks if low - 1e-9 <= tick.get_loc() <= high + 1e-9]
    return texts


def overlaps(figure: Figure) -> list[tuple[str, str]]:
    """Pairs of visible texts whose boxes intersect once drawn, and texts that stick out of the figure."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
    texts = [text for text in drawn_texts(figure) if text.get_visible() and text.get_text().strip()]
    boxes = [(text.get_text(), text.get_window_extent(renderer)) for text in texts]
    page = figure.bbox
    clashes = [(name, "figure edge") for name, box in boxes if box.x0 < page.x0 - 1 or box.x1 > page.x1 + 1]
    for index, (name, box) in enumerate(boxes):
        clashes += [(name, other) for other, box2 in boxes[index + 1 :] if box.overlaps(box2)]
    return clashes


def test_a_methods_search_gets_a_per_method_plot_and_no_importances() -> None:
    cfg = load_config(QUICKSTART)
    drawn = figures(methods_search(), cfg)
    # Optuna rates the method below 0.01 over trials that share every parameter: kdray compares methods instead
    assert set(drawn) == {"optimization_history", "methods", "metric_vs_params", "chain_depth"}
    panels = [axes.get_xlabel() for axes in drawn["metric_vs_params"].axes]
    assert panels == ["method.temperature", "method.margin", "method.alpha", "assistants.depth"]
    for name, figure in drawn.items():
        assert overlaps(figure) == [], name
    pngs = to_png(drawn)
    assert all(png.startswith(b"\x89PNG") for png in pngs.values())


def test_one_method_with_several_parameters_gets_importances() -> None:
    cfg = load_config(
        None,
        [
            "method.name=triplet",
            "search.space={method.temperature: {kind: logfloat, low: 1, high: 8}, "
            "method.margin: {kind: float, low: 0.5, high: 5}}",
        ],
    )
    rows = [
        trial("triplet", 0.5 + 0.05 * i, method_temperature=1.0 + i, method_margin=0.5 + 0.3 * (i % 3))
        for i in range(6)
    ]
    drawn = figures(SearchReport("val/acc", "max", rows, {}, {}), cfg)
    assert set(drawn) == {"optimization_history", "param_importances", "metric_vs_params"}
    bars = {bar.get_text() for bar in drawn["param_importances"].axes[0].get_yticklabels()}
    assert bars == {"method.temperature", "method.margin"}
    for name, figure in drawn.items():
        assert overlaps(figure) == [], name


@pytest.mark.parametrize("count", [0, 1])
def test_fewer_than_two_points_draw_nothing(count: int) -> None:
    rows = [trial("kd", 0.9, method_temperature=4.0)][:count]
    assert figures(SearchReport("val/acc", "max", rows, {}, {}), load_config(QUICKSTART)) == {}


def test_a_parameter_that_took_one_value_has_no_panel() -> None:
    rows = [trial("takd", 0.9, method_temperature=t, assistants_depth=1) for t in (1.0, 2.0, 3.0)]
    drawn = figures(SearchReport("val/acc", "max", rows, {}, {}), load_config(QUICKSTART))
    assert "chain_depth" not in drawn
    assert [axes.get_xlabel() for axes in drawn["metric_vs_params"].axes] == ["method.temperature"]
