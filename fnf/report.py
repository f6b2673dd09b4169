"""``fnf report RUN [RUN ...] --out DIR``: what did the runs do to the images? One self-contained page.

Reads, per run folder (fnf/run_folder.py), what ``fnf fit`` and ``fnf test`` (with the ``Evaluation`` callback)
left there: ``test_metrics.json``, ``test_samples/`` and the training scalars (TensorBoard, CSV, MLflow or W&B files).
Writes ``DIR/metrics.json``, ``DIR/metrics.md`` (rows: runs) and ``DIR/index.html``: a sortable summary table
with grouped, wrapping headers (fits a 1400-px window), the reward / preservation trade-off across runs with the
base model at the origin, reward vs step per run, and per sample base | tuned | heatmap | mask | |difference|×4
with its numbers; with ``test_items.jsonl`` in the runs, each later run against the first item by item: every
metric's difference with a 95% paired bootstrap interval (fnf.paired; also ``DIR/paired.json``). Images are
embedded (data URIs): the page is one file. DIR is written whole after every run has
been read, and replaces only an earlier report (``fnf_report.json`` in it), never another folder.
"""

from __future__ import annotations

import html
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from fnf.charts import line_chart, scatter_with_origin, to_svg
from fnf.errors import OneLineParser
from fnf.output_folder import check_output_folder, write_text_folder
from fnf.paired import Difference, paired_differences
from fnf.run_folder import load_run

REWARD, JUDGES, PRESERVATION = ("Reward change, tuned − base ↑", "Alignment and judges, base → tuned",
                                "Preservation, tuned vs base")
PRESERVATION_COLUMNS = {  # key -> header; ↑ / ↓: higher / lower is better (inside the mask, change is wanted)
    "outside_psnr": "PSNR out, dB ↑", "reference_outside_psnr": "PSNR out (ref.), dB ↑",
    "outside_ssim": "SSIM out ↑", "outside_lpips": "LPIPS out ↓", "reference_outside_lpips": "LPIPS out (ref.) ↓",
    "inside_psnr": "PSNR in, dB", "all_psnr": "PSNR all, dB", "fid_tuned_vs_base": "FID ↓"}
# One table up to this many characters: Chromium lays the shapes world's tables out at ~5.6 px a character
# at their narrowest, so ~1120 px of the ~1320 px a 1400-px window leaves between the page margins.
TABLE_CHARACTERS = 200
LEGEND = ("Base = LoRA off, tuned = LoRA on, same x_T per (prompt, seed). out / in: outside / inside the run's "
          "own training mask; ref.: outside the Evaluation callback's reference mask (the same pixels for every "
          "run); all: the whole image. PSNR 200 dB and SSIM 1 = identical to the base image; FID of tuned vs base "
          "images. ↑ / ↓: higher / lower is better. 3 significant digits; hover a cell for the full value and a "
          "header for the metric key; click a header to sort.")


PAIRED_LEGEND = ("Each later run against the first on the items both were tested on (prompt, seed; the same x_T and "
                 "base image): the metric pooled as fnf test pools it, their difference, and its 95% interval over "
                 "2000 bootstrap draws of the items (both runs resampled alike). An interval that holds 0 is a "
                 "difference these items cannot tell from none. *_tuned: the tuned images' value; outside_psnr: "
                 "outside each run's own mask, reference_outside_psnr: outside the reference mask.")
BASE_MODEL = "base model (LoRA off): no change"


@dataclass(frozen=True)
class Column:
    """One summary column: one metric, or a (base, tuned) pair shown as ``base → tuned`` and sorted by tuned."""

    group: str
    label: str
    keys: tuple[str, ...]


def compact(value: float) -> str:
    """3 significant digits, short exponents (``7.59e-5``); a value near 1 keeps the digits that tell it from 1."""
    if not math.isfinite(value) or value == 0:
        return "0" if value == 0 else str(value)
    if abs(value) >= 1e5 or abs(value) < 1e-3:
        mantissa, exponent = f"{value:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    text = f"{value:.3g}"
    if "e" in text:  # rounded up to 1e5 (99999.9)
        mantissa, exponent = text.split("e")
        return f"{mantissa}e{int(exponent)}"
    if abs(float(text)) == 1 and abs(value) != 1:  # SSIM 0.99999 is not 1: the digits up to the first that differs
        digits = math.ceil(-math.log10(abs(abs(value) - 1)))
        text = f"{value:.{digits}f}".rstrip("0")
    return text


MARKER = "fnf_report.json"  # the runs a report folder shows; only a folder holding it is replaced


def summary_columns(metrics: list[dict[str, float]]) -> list[Column]:
    """Reward changes per head, judges and CLIP score as base → tuned, then preservation (category/* left out)."""
    keys = set().union(*metrics)
    columns = [Column(REWARD, k.split("/", 1)[1], (k,)) for k in sorted(keys) if k.startswith("reward_change/")]
    pairs = sorted({k.rsplit("_", 1)[0] for k in keys
                    if k.startswith(("judge_", "clip_score_")) and k.endswith(("_base", "_tuned"))})
    columns += [Column(JUDGES, "CLIP score" if name == "clip_score" else name.removeprefix("judge_").replace("_", " "),
                       tuple(k for k in (f"{name}_base", f"{name}_tuned") if k in keys)) for name in pairs]
    return columns + [Column(PRESERVATION, label, (k,)) for k, label in PRESERVATION_COLUMNS.items() if k in keys]


def _cell_text(metrics: dict[str, float], column: Column) -> str:
    if column.keys[-1] not in metrics:
        return ""
    return " → ".join(compact(metrics[k]) if k in metrics else "–" for k in column.keys)


def _cell(metrics: dict[str, float], column: Column) -> str:
    """Compact text; the full values as a tooltip; the (tuned) value to sort by."""
    if column.keys[-1] not in metrics:
        return "<td></td>"
    full = ", ".join(f"{k} = {metrics[k]!r}" for k in column.keys if k in metrics)
    return (f"<td data-value='{metrics[column.keys[-1]]!r}' title='{html.escape(full)}'>"
            f"{html.escape(_cell_text(metrics, column))}</td>")


def _header(column: Column, index: int) -> str:
    """A short header that may wrap between words and inside CamelCase names (``Shapes<wbr>Artifact``)."""
    label = re.sub(r"(?<=[a-z])(?=[A-Z][a-z])", "<wbr>", html.escape(column.label))
    return f"<th data-col='{index}' title='{html.escape(' / '.join(column.keys))}'>{label}</th>"


def _table(runs: list[dict], columns: list[Column]) -> str:
    groups = "".join(f"<th colspan='{len(list(members))}' class='group'>{html.escape(group)}</th>"
                     for group, members in itertools.groupby(columns, key=lambda c: c.group))
    rows = "".join(f"<tr><td class='run' data-value='{html.escape(run['name'])}'>{html.escape(run['name'])}</td>"
                   + "".join(_cell(run["metrics"], c) for c in columns) + "</tr>" for run in runs)
    return (f"<div class='table'><table class='sortable'><thead><tr><th rowspan='2' data-col='0'>run</th>{groups}"
            f"</tr><tr>{''.join(_header(c, i) for i, c in enumerate(columns, start=1))}</tr></thead>"
            f"<tbody>{rows}</tbody></table></div>")


def _width_in_characters(runs: list[dict], columns: list[Column]) -> int:
    """Narrowest width of the one-table layout, counted in characters: per column its longest cell or header
    word, plus padding; the run names wrap after 14."""
    def narrowest(column: Column) -> int:
        return max([len(word) for word in column.label.split()]
                   + [len(_cell_text(run["metrics"], column)) for run in runs]) + 2

    return sum(map(narrowest, columns)) + min(max(len(run["name"]) for run in runs), 14) + 2


def summary_table(runs: list[dict]) -> str:
    """Runs as rows under grouped, wrapping headers, then the legend. Too many columns for a 1400-px window
    (more than ``TABLE_CHARACTERS`` characters wide): one table per group, stacked."""
    columns = summary_columns([run["metrics"] for run in runs])
    if _width_in_characters(runs, columns) <= TABLE_CHARACTERS:
        tables = _table(runs, columns)
    else:
        tables = "".join(_table(runs, list(members)) for _, members in itertools.groupby(columns, lambda c: c.group))
    return f"{tables}<p class='legend'>{html.escape(LEGEND)}</p>"


def summary_markdown(runs: list[dict]) -> str:
    """The summary table as Markdown: full metric keys as headers, 4 significant digits."""
    columns = summary_columns([run["metrics"] for run in runs])
    header = "| run | " + " | ".join(" → ".join(c.keys) for c in columns) + " |\n|---|" + "---|" * len(columns) + "\n"
    return header + "".join(f"| {run['name']} | " + " | ".join(
        " → ".join(f"{run['metrics'][k]:.4g}" for k in c.keys if k in run["metrics"]) for c in columns) + " |\n"
        for run in runs)


def rms_change(psnr: float) -> float:
    """Root-mean-square pixel change in 0–255 levels from a PSNR of data range 1 (200 dB, identical: ~0)."""
    return 255 * 10 ** (-psnr / 20)


def _finite(metrics: dict[str, float], *keys: str) -> bool:
    return all(math.isfinite(metrics.get(key, math.nan)) for key in keys)


def tradeoff_figure(runs: list[dict], head: str, psnr_key: str, mask: str) -> Figure:
    """Reward change of ``head`` vs RMS pixel change outside the mask: one dot per run with finite numbers, the
    base model at the origin."""
    change = f"reward_change/{head}"
    plotted = {run["name"]: (run["metrics"][change], rms_change(run["metrics"][psnr_key])) for run in runs
               if _finite(run["metrics"], change, psnr_key)}
    return scatter_with_origin(plotted, f"{head} reward change, tuned − base (score)",
                               f"RMS change outside {mask} (0–255 levels)", origin=BASE_MODEL)


def _tradeoff_chart(runs: list[dict], head: str, psnr_key: str, mask: str) -> str:
    change = f"reward_change/{head}"
    left_out = [run["name"] for run in runs if not _finite(run["metrics"], change, psnr_key)]
    note = f"not plotted (no finite {change} or {psnr_key}): {', '.join(left_out)}" if left_out else ""
    return (f"<figure class='chart'>{to_svg(tradeoff_figure(runs, head, psnr_key, mask), f'tradeoff {head}')}"
            f"<figcaption class='note'>{html.escape(note)}</figcaption></figure>")


def tradeoff_charts(runs: list[dict]) -> str:
    """Per reward head: reward change vs pixel change outside the mask, one dot per run, base at (0, 0). The
    reference mask when every run has it (the same pixels for all), else each run's own mask."""
    heads = sorted({k.split("/", 1)[1] for run in runs for k in run["metrics"] if k.startswith("reward_change/")})
    if not heads:
        return "<p class='empty'>No trade-off plot: no run's test_metrics.json has reward_change/* values.</p>"
    reference = all("reference_outside_psnr" in run["metrics"] for run in runs)
    psnr_key, mask = ("reference_outside_psnr", "ref. mask") if reference else ("outside_psnr", "mask")
    return (f"<p class='note'>One dot per run; the base model is the origin (no reward change, identical image). "
            f"Right: the reward improved; up: pixels outside the {'reference ' * reference}mask changed (RMS in "
            f"0–255 levels = 255·10^(−PSNR/20), from {psnr_key}). Best: far right and low.</p><div class='grid'>"
            + "".join(_tradeoff_chart(runs, head, psnr_key, mask) for head in heads) + "</div>")


def _sample_numbers(sample: dict) -> str:
    """``mean |tuned − base| 3.6e-4; ColorRegion -0.296 → -0.296; ...`` (reward of the base → tuned image)."""
    heads = [k.removeprefix("reward_base/") for k in sample if k.startswith("reward_base/")]
    numbers = [f"mean |tuned − base| {compact(sample['mean_abs_change'])}"] if "mean_abs_change" in sample else []
    numbers += [f"{head} {compact(sample[f'reward_base/{head}'])} → {compact(sample[f'reward_tuned/{head}'])}"
                for head in heads if f"reward_tuned/{head}" in sample]
    return html.escape("; ".join(numbers))


def _curve_title(tag: str) -> str:
    return "fidelity term" if tag == "train/fidelity" else f"{tag.removeprefix('train/reward/')} reward (score)"


def _curve_chart(run_name: str, tag: str, points: list[tuple[int, float]]) -> str:
    figure = line_chart({tag: points}, "optimizer step", _curve_title(tag), whole_x=True)
    return f"<figure class='chart'>{to_svg(figure, f'{run_name} {tag}')}</figure>"


def run_section(run: dict) -> str:
    """Training curves and samples of one run; an empty part says why it is empty."""
    if run["curves"]:
        curves = "<div class='grid'>" + "".join(_curve_chart(run["name"], tag, points)
                                                for tag, points in run["curves"].items()) + "</div>"
    elif run.get("curves_left_out"):
        curves = f"<p class='empty'>No training curves: {html.escape(run['curves_left_out'])}.</p>"
    else:
        curves = ("<p class='empty'>No training curves in this run (test-only, or fit without a logger): no "
                  "train/reward/* or train/fidelity scalars in TensorBoard, CSV, MLflow or W&B files in its "
                  "folder.</p>")
    cards = "".join(
        f"<figure><img src='data:image/png;base64,{s['png']}' alt='{html.escape(s['prompt'])}'>"
        f"<figcaption>{html.escape(s['prompt'])} (seed {s['seed']})<br>{_sample_numbers(s)}</figcaption></figure>"
        for s in run["samples"])
    samples = (f"<div class='grid'>{cards}</div>" if cards else "<p class='empty'>No samples in this run: no "
               "test_samples/ beside its test_metrics.json (set the Evaluation callback's save_samples for fnf test)."
               "</p>")
    return (f"<h2>{html.escape(run['name'])}</h2><p class='source'>{html.escape(run['folder'])}</p>"
            f"<h3>Training curves</h3>{curves}"
            f"<h3>Samples: base | tuned | heatmap | mask | |tuned − base|×4</h3>{samples}")


SCRIPT = """document.querySelectorAll('table.sortable th[data-col]').forEach(th => th.onclick = () => {
  const body = th.closest('table').tBodies[0], col = +th.dataset.col, up = th.dataset.up !== '1';
  const key = row => row.cells[col].dataset.value ?? '';
  [...body.rows].sort((a, b) => { const x = parseFloat(key(a)), y = parseFloat(key(b));
    if (isNaN(x) || isNaN(y)) return (isNaN(x) - isNaN(y)) || key(a).localeCompare(key(b)) * (up ? 1 : -1);
    return (x - y) * (up ? 1 : -1); }).forEach(row => body.appendChild(row));
  th.dataset.up = up ? '1' : '0'; });"""
STYLE = """body{font-family:sans-serif;margin:1.5em 2em;max-width:1600px}
table{border-collapse:collapse;font-size:12px;font-variant-numeric:tabular-nums}
td,th{border:1px solid #ccc;padding:3px 5px}
th{background:#eee;cursor:pointer;font-weight:600;vertical-align:bottom;max-width:8em;white-space:normal}
th.group{background:#ddd;cursor:default;max-width:none;text-align:center}
td{text-align:right;white-space:nowrap}
td.run{text-align:left;white-space:normal;overflow-wrap:anywhere;min-width:8em;max-width:14em}
div.table{max-width:100%;overflow-x:auto;margin-bottom:8px}
p.legend,p.source,p.note{color:#444;font-size:13px;max-width:1200px}p.empty{color:#666;font-style:italic}
.grid{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;width:330px;font-size:11px}
figure img{width:320px;image-rendering:pixelated}figure.chart{width:auto}
figcaption.note{color:#444;font-size:12px;max-width:420px}"""


def paired(runs: list[dict]) -> dict[str, list[Difference] | str]:
    """Every later run against the first, item by item (fnf.paired): its differences, or why there are none."""
    first, comparisons = runs[0], {}
    for run in runs[1:]:
        if first["items"] is None or run["items"] is None:
            missing = first if first["items"] is None else run
            comparisons[run["name"]] = f"{missing['name']} has no test_items.jsonl (tested before fnf wrote one)"
            continue
        try:
            comparisons[run["name"]] = paired_differences(first["items"], run["items"])
        except ValueError as error:
            comparisons[run["name"]] = str(error)
    return comparisons


def paired_html(runs: list[dict], comparisons: dict[str, list[Difference] | str]) -> str:
    """One table per compared run: metric | first run | this run | difference | 95% interval."""
    if not comparisons:
        return ""
    parts = [f"<h2>Paired differences against {html.escape(runs[0]['name'])}</h2><p class='legend'>"
             f"{html.escape(PAIRED_LEGEND)}</p>"]
    for name, differences in comparisons.items():
        parts.append(f"<h3>{html.escape(name)} − {html.escape(runs[0]['name'])}</h3>")
        if isinstance(differences, str):
            parts.append(f"<p class='empty'>No paired comparison: {html.escape(differences)}.</p>")
            continue
        rows = "".join(f"<tr><td class='run'>{html.escape(d.metric)}</td><td>{compact(d.a)}</td><td>{compact(d.b)}"
                       f"</td><td>{compact(d.delta)}</td><td>[{compact(d.low)}, {compact(d.high)}]</td></tr>"
                       for d in differences)
        parts.append(f"<div class='table'><table><thead><tr><th>metric</th><th>{html.escape(runs[0]['name'])}</th>"
                     f"<th>{html.escape(name)}</th><th>difference</th><th>95% interval</th></tr></thead>"
                     f"<tbody>{rows}</tbody></table></div>")
    return "".join(parts)


def paired_markdown(runs: list[dict], comparisons: dict[str, list[Difference] | str]) -> str:
    text = ""
    for name, differences in comparisons.items():
        text += f"\n## {name} − {runs[0]['name']}, item by item (95% paired bootstrap interval)\n\n"
        if isinstance(differences, str):
            text += f"No paired comparison: {differences}.\n"
            continue
        text += f"| metric | {runs[0]['name']} | {name} | difference | 95% interval |\n|---|---|---|---|---|\n"
        text += "".join(f"| {d.metric} | {d.a:.4g} | {d.b:.4g} | {d.delta:.4g} | [{d.low:.4g}, {d.high:.4g}] |\n"
                        for d in differences)
    return text


def render_html(runs: list[dict], comparisons: dict[str, list[Difference] | str]) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>fnf report</title><style>{STYLE}</style>"
            f"</head><body><h1>fnf report</h1>{summary_table(runs)}<h2>Trade-off across runs</h2>"
            f"{tradeoff_charts(runs)}{paired_html(runs, comparisons)}{''.join(run_section(run) for run in runs)}"
            f"<script>{SCRIPT}</script></body></html>")


def write_report(run_dirs: list[Path], out: Path) -> Path:
    """``out`` written whole once every run has been read and the page rendered (a bad run leaves nothing)."""
    check_output_folder(out, "--out", "fnf report", MARKER)
    runs = [load_run(Path(d)) for d in run_dirs]
    if len({run["name"] for run in runs}) < len(runs):  # same folder name in different places: use the paths
        for run in runs:
            run["name"] = run["folder"]
    comparisons = paired(runs)
    files = {
        "index.html": render_html(runs, comparisons), "metrics.md": summary_markdown(runs) + paired_markdown(
            runs, comparisons),
        "metrics.json": json.dumps({run["name"]: {key: value if math.isfinite(value) else None  # strict JSON: null
                                                  for key, value in run["metrics"].items()} for run in runs},
                                   indent=2, sort_keys=True, allow_nan=False) + "\n",
        MARKER: json.dumps({"runs": [run["folder"] for run in runs]}, indent=2) + "\n"}
    if comparisons:  # two runs or more
        files["paired.json"] = json.dumps({name: [d.as_json() for d in differences] if isinstance(differences, list)
                                           else {"none": differences} for name, differences in comparisons.items()},
                                          indent=2) + "\n"
    write_text_folder(out, files)
    return out / "index.html"


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="fnf report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (default_root_dir of fit / test)")
    parser.add_argument("--out", type=Path, default=Path("report"), help="output folder")
    args = parser.parse_args(argv)
    print(write_report(args.runs, args.out))
