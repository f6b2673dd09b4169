"""fnf.charts: the report's figures read at a glance (matplotlib axes inspected, no image comparison)."""

from __future__ import annotations

from fnf.charts import line_chart, scatter_with_origin


def test_the_origin_marker_is_inside_the_frame_when_no_run_is_near_it():
    axes = scatter_with_origin({"a": (1.0, 2.0), "b": (3.0, 5.0)}, "x (unit)", "y (unit)", "base model").axes[0]
    (x0, x1), (y0, y1) = axes.get_xlim(), axes.get_ylim()
    assert x0 < 0 < 3 < x1 and y0 < 0 < 5 < y1  # the origin and every run, with a margin
    assert [text.get_text() for text in axes.get_legend().get_texts()] == ["a", "b", "base model"]


def test_step_curves_get_whole_step_ticks_and_drop_non_finite_points():
    axes = line_chart({"loss": [(0, 1.0), (1, float("nan")), (2, 0.5), (3, 0.25)]}, "optimizer step", "loss",
                      whole_x=True).axes[0]
    assert [x for x, _ in axes.lines[0].get_xydata()] == [0, 2, 3]
    ticks = [t for t in axes.get_xticks() if axes.get_xlim()[0] <= t <= axes.get_xlim()[1]]
    assert len(ticks) >= 2 and all(t == int(t) for t in ticks)
    assert axes.get_legend() is None  # one series: the axis title names it
