"""The charts of ``fnf report`` and ``fnf preview``: matplotlib figures, embedded in the page as inline SVG.

matplotlib draws the axes, round ticks, legends and histograms; text stays text (searchable, selectable; the
browser's sans-serif if DejaVu Sans is missing). Figures are built without pyplot (no global state, no
display needed). Chart builders return the Figure, so tests read its data, limits and labels directly.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import matplotlib
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

SIZE = (4.4, 2.9)  # inches (96 CSS px each): ~420 × 280 px, three side by side in a 1400-px window
STYLE = {"svg.fonttype": "none", "font.family": "DejaVu Sans", "font.size": 9, "axes.titlesize": 9,
         "axes.grid": True, "axes.axisbelow": True, "grid.color": "#e8e8e8", "legend.fontsize": 8,
         "legend.frameon": False, "axes.formatter.useoffset": False}  # 1e-5 steps: no "+0.287" offset text
ORIGIN = {"marker": "D", "s": 60, "facecolors": "none", "edgecolors": "black", "linewidths": 1.5, "zorder": 3}


def _axes(x_label: str, y_label: str) -> tuple[Figure, Axes]:
    figure = Figure(figsize=SIZE)
    axes = figure.add_subplot()
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    return figure, axes


def _legend_below(axes: Axes) -> None:
    """Below the plot, so it never covers a point; the figure grows with the number of entries. Two columns of
    short labels, else one (the chart keeps its width)."""
    labels = axes.get_legend_handles_labels()[1]
    columns = 2 if max(map(len, labels)) <= 24 else 1
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=columns, handletextpad=0.4)


def scatter_with_origin(points: dict[str, tuple[float, float]], x_label: str, y_label: str,
                        origin: str) -> Figure:
    """One dot per name, each in the legend, and the reference at (0, 0): a hollow diamond named ``origin`` on
    dashed axes (both always in view, with a margin)."""
    with matplotlib.rc_context(STYLE):
        figure, axes = _axes(x_label, y_label)
        axes.axhline(0, color="#888", linestyle="--", linewidth=0.8, zorder=1)
        axes.axvline(0, color="#888", linestyle="--", linewidth=0.8, zorder=1)
        for name, (x, y) in points.items():
            axes.scatter([x], [y], s=36, label=name, zorder=2)
        axes.scatter([0], [0], label=origin, **ORIGIN)  # drawn last: a run at (0, 0) shows through it
        axes.margins(0.08)
        _legend_below(axes)
    return figure


def line_chart(series: dict[str, Sequence[tuple[float, float]]], x_label: str, y_label: str, *,
               whole_x: bool = False) -> Figure:
    """Named (x, y) series as lines, with dots when there are few points; ``whole_x``: x counts something
    (steps), so integer ticks. A lone series has no legend (the axis title names it). Non-finite points are
    left out."""
    with matplotlib.rc_context(STYLE):
        figure, axes = _axes(x_label, y_label)
        for name, values in series.items():
            finite = [(x, y) for x, y in values if math.isfinite(x) and math.isfinite(y)]
            if finite:
                axes.plot(*zip(*finite), marker="o" if len(finite) <= 20 else None, markersize=3, label=name)
        if whole_x:
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(series) > 1:
            _legend_below(axes)
    return figure


def histogram(samples: dict[str, Sequence[float]], bins: Sequence[float], x_label: str, y_label: str) -> Figure:
    """Side-by-side bars per named sample over shared ``bins`` (edges), one legend entry per sample."""
    with matplotlib.rc_context(STYLE):
        figure, axes = _axes(x_label, y_label)
        axes.hist([list(values) for values in samples.values()], bins=list(bins), label=list(samples))
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts of images
        axes.grid(axis="x", visible=False)
        _legend_below(axes)
    return figure


def _factor_into_titles(figure: Figure) -> None:
    """matplotlib writes a factor shared by the tick labels (``1e−5``) at the end of the axis, where a long axis
    title runs into it: move it into the title."""
    figure.draw_without_rendering()  # the formatters choose their factor while drawing
    for axes in figure.axes:
        for axis in (axes.xaxis, axes.yaxis):
            factor = axis.get_major_formatter().get_offset()
            if factor and axis.offsetText.get_visible():
                axis.set_label_text(f"{axis.get_label_text()}, ×{factor}")
                axis.offsetText.set_visible(False)


def to_svg(figure: Figure, name: str) -> str:
    """The figure as an ``<svg>`` element for an HTML page. ``name`` (unique in the page) seeds the ids of its
    clip paths and markers, so that charts on one page never share an id and the output is reproducible."""
    buffer = io.StringIO()
    with matplotlib.rc_context({**STYLE, "svg.hashsalt": name}):
        _factor_into_titles(figure)
        figure.savefig(buffer, format="svg", bbox_inches="tight", pad_inches=0.05, metadata={"Date": None})
    svg = buffer.getvalue()
    return svg[svg.index("<svg"):]
