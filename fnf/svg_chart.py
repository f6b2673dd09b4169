"""Small inline-SVG charts for ``fnf report``: labelled axes with round ticks, ranges that hold every point
with a margin, an HTML legend. Hand-written so the report needs no plotting library and stays one file."""

from __future__ import annotations

import html
import math

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
WIDTH, HEIGHT = 420, 280
LEFT, RIGHT, TOP, BOTTOM = 62, 14, 12, 44  # room for tick labels and axis titles


def compact(value: float) -> str:
    """3 significant digits, short exponents (``7.59e-5``); a value near 1 keeps the digits that tell it from 1."""
    if not math.isfinite(value) or value == 0:
        return "0" if value == 0 else str(value)
    if abs(value) >= 1e5 or abs(value) < 1e-3:
        mantissa, exponent = f"{value:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    text = f"{value:.3g}"
    if float(text) == 1 and value != 1:  # SSIM 0.99999 is not 1
        text = f"{value:.6f}".rstrip("0")
    return text


def tick_labels(values: list[float]) -> list[str]:
    """Labels for evenly spaced ticks with just the digits that tell neighbours apart (-0.2865, -0.2870)."""
    if len(values) < 2:
        return [compact(v) for v in values]
    step = values[1] - values[0]
    exponent = math.floor(math.log10(step) + 1e-9)  # step = m × 10^exponent, m in 1, 2, 2.5, 5
    digits = -exponent + (round(step / 10**exponent, 6) == 2.5)
    if digits <= 4:  # fixed point
        return ["0" if v == 0 else f"{v:.{max(digits, 0)}f}" for v in values]
    mantissa_digits = max(0, math.floor(math.log10(max(abs(v) for v in values))) + digits)
    labels = []
    for v in values:  # tiny steps: 1e-5, 1.5e-5 rather than 0.000015
        mantissa, power = f"{v:.{mantissa_digits}e}".split("e")
        labels.append("0" if v == 0 else f"{mantissa}e{int(power)}")
    return labels


def axis_range(values: list[float], margin: float = 0.08) -> tuple[float, float]:
    """[min, max] of ``values`` widened by ``margin`` of the span on each side (no point sits on the frame)."""
    low, high = min(values), max(values)
    if high == low:  # one value (or all equal): a span around it
        low, high = low - (abs(low) or 1.0), high + (abs(high) or 1.0)
    span = high - low
    return low - margin * span, high + margin * span


def ticks(low: float, high: float, count: int = 5, whole: bool = False) -> list[float]:
    """About ``count`` round values (1, 2, 2.5, 5 × 10^k; ``whole``: no fractions) inside [low, high]."""
    raw = max((high - low) / count, 1.0) if whole else (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(low / step) * step
    return [round(first + i * step, 12) for i in range(int((high - first) / step + 1e-9) + 1)]


def _title_size(text: str, room: float) -> float:
    """Font size (≤ 12 px) at which an axis title fits ``room`` px: sans-serif glyphs average ~0.55 em."""
    return round(min(12.0, room / (0.55 * len(text))), 1)


def chart(series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str, *, lines: bool = True,
          origin: str | None = None, note: str = "", whole_x: bool = False) -> str:
    """A line (or, ``lines=False``, dot) chart of named series with a legend (and ``note`` after it);
    ``origin`` names a marker at (0, 0) (e.g. the base model), which the axis ranges then include;
    ``whole_x``: x counts something (steps), so no fractional ticks. A lone series without an origin gets no
    legend (the axis title names it). Non-finite points are left out."""
    series = {name: [(x, y) for x, y in values if math.isfinite(x) and math.isfinite(y)]
              for name, values in series.items()}
    points = [p for values in series.values() for p in values] + ([(0.0, 0.0)] if origin is not None else [])
    if not points:
        return "<p class='empty'>(no finite values)</p>"
    (x0, x1), (y0, y1) = axis_range([x for x, _ in points]), axis_range([y for _, y in points])
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return TOP + (y1 - y) / (y1 - y0) * plot_h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" class="chart" '
             f'font-size="11" font-family="sans-serif">']
    x_ticks, y_ticks = ticks(x0, x1, whole=whole_x), ticks(y0, y1)
    for x, label in zip(x_ticks, tick_labels(x_ticks)):
        parts.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{TOP}" y2="{TOP + plot_h}" stroke="#eee"/>'
                     f'<text x="{px(x):.1f}" y="{TOP + plot_h + 14}" text-anchor="middle">{label}</text>')
    for y, label in zip(y_ticks, tick_labels(y_ticks)):
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#eee"/>'
                     f'<text x="{LEFT - 4}" y="{py(y) + 4:.1f}" text-anchor="end">{label}</text>')
    parts.append(f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>')
    if origin is not None:  # the axes through (0, 0): where the base model sits
        parts.append(f'<line x1="{px(0):.1f}" x2="{px(0):.1f}" y1="{TOP}" y2="{TOP + plot_h}" stroke="#888" '
                     f'stroke-dasharray="4 3"/><line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{py(0):.1f}" '
                     f'y2="{py(0):.1f}" stroke="#888" stroke-dasharray="4 3"/>')
    parts.append(f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 6}" text-anchor="middle" '
                 f'font-size="{_title_size(x_label, plot_w + 2 * RIGHT)}">{html.escape(x_label)}</text>'
                 f'<text x="12" y="{TOP + plot_h / 2}" text-anchor="middle" font-size="{_title_size(y_label, plot_h)}" '
                 f'transform="rotate(-90 12 {TOP + plot_h / 2})">{html.escape(y_label)}</text>')
    legend = []
    for i, (name, values) in enumerate(series.items()):
        colour, title = COLOURS[i % len(COLOURS)], f"<title>{html.escape(name)}</title>"
        if lines and len(values) > 1:
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in values)
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{path}">'
                         f'{title}</polyline>')
        if not lines or len(values) <= 20:  # few points: show each one
            parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="{2.5 if lines else 5}" fill="{colour}">'
                      f'{title}</circle>' for x, y in values]
        legend.append(f"<span><i style='background:{colour}'></i>{html.escape(name)}</span>")
    if origin is not None:
        parts.append(f'<rect x="{px(0) - 6:.1f}" y="{py(0) - 6:.1f}" width="12" height="12" fill="none" stroke="#000" '
                     f'stroke-width="1.5" transform="rotate(45 {px(0):.1f} {py(0):.1f})"><title>'
                     f'{html.escape(origin)}</title></rect>')  # hollow: a run at (0, 0) shows through
        legend.append(f"<span><i class='origin'></i>{html.escape(origin)}</span>")
    if len(series) == 1 and origin is None and not note:
        legend = []
    return (f"<figure class='chart'>{''.join(parts)}</svg>"
            f"<figcaption class='legend'>{''.join(legend)}{note}</figcaption></figure>")
