"""``fnf report RUN [RUN ...] --out DIR``: what did the runs do to the images? One self-contained page.

Reads, per run folder, what ``fnf fit`` and ``fnf test`` (with the ``Evaluation`` callback) left there:
``test_metrics.json``, ``test_samples/`` and the TensorBoard scalars. Writes ``DIR/metrics.json``,
``DIR/metrics.md`` (rows: runs) and ``DIR/index.html``: a sortable summary table, the reward /
preservation trade-off across runs, reward vs step per run, and per sample base | tuned | heatmap |
mask | |difference|×4 with its numbers. Images are embedded (data URIs): the page is one file.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
from pathlib import Path

SUMMARY_KEYS = ("outside_psnr", "outside_ssim", "inside_psnr", "all_psnr", "fid_tuned_vs_base")


def _newest(run: Path, pattern: str) -> Path | None:
    found = sorted(run.rglob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def load_run(run: Path) -> dict:
    """Metrics, samples and training curves of one run folder (any of them may be missing, except metrics)."""
    metrics_file = _newest(run, "test_metrics.json")
    if metrics_file is None:
        raise FileNotFoundError(f"{run}: no test_metrics.json; run `fnf test` with the Evaluation callback first")
    samples_file = metrics_file.parent / "test_samples" / "samples.json"
    samples = json.loads(samples_file.read_text()) if samples_file.is_file() else []
    for sample in samples:
        sample["png"] = base64.b64encode((samples_file.parent / sample["image"]).read_bytes()).decode()
    return {"name": run.name, "metrics": json.loads(metrics_file.read_text()), "samples": samples,
            "curves": training_curves(run)}


def training_curves(run: Path) -> dict[str, list[tuple[int, float]]]:
    """``train/reward/*`` and ``train/fidelity`` scalars from the run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(run.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            if tag.startswith("train/reward/") or tag == "train/fidelity":
                curves.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return {tag: sorted(points) for tag, points in curves.items()}


def summary_row(run: dict) -> dict[str, float]:
    metrics = run["metrics"]
    row = {k: v for k, v in metrics.items() if k.startswith(("reward_change/", "judge_"))}
    if "clip_score_tuned" in metrics:
        row["clip_score_change"] = metrics["clip_score_tuned"] - metrics["clip_score_base"]
    return row | {k: metrics[k] for k in SUMMARY_KEYS if k in metrics}


def svg_plot(series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str, dots: bool = False) -> str:
    """A small line (or dot) chart as inline SVG: no plotting library needed."""
    points = [p for values in series.values() for p in values]
    if not points:
        return "<p>(no data)</p>"
    (x0, x1), (y0, y1) = [(min(v), max(v)) for v in zip(*points)]
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    plot, height, pad, legend = 340, 220, 40, 150
    width = plot + legend

    def at(x: float, y: float) -> str:
        return f"{pad + (x - x0) / (x1 - x0) * (plot - 2 * pad):.1f},{height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad):.1f}"

    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="plot">',
             f'<rect x="{pad}" y="{pad}" width="{plot - 2 * pad}" height="{height - 2 * pad}" fill="none" stroke="#999"/>',
             f'<text x="{plot / 2}" y="{height - 8}" text-anchor="middle" font-size="12">{html.escape(x_label)}</text>',
             f'<text x="12" y="{height / 2}" transform="rotate(-90 12 {height / 2})" text-anchor="middle" font-size="12">{html.escape(y_label[:40])}</text>',
             f'<text x="{pad + 2}" y="{pad - 4}" font-size="10">{y1:.3g}</text>',
             f'<text x="{pad + 2}" y="{height - pad - 4}" font-size="10">{y0:.3g}</text>',
             f'<text x="{pad}" y="{height - pad + 12}" font-size="10">{x0:.3g}</text>',
             f'<text x="{plot - pad}" y="{height - pad + 12}" font-size="10" text-anchor="end">{x1:.3g}</text>']
    for i, (name, values) in enumerate(series.items()):
        colour = colours[i % len(colours)]
        if dots:
            parts += [f'<circle cx="{at(x, y).split(",")[0]}" cy="{at(x, y).split(",")[1]}" r="4" fill="{colour}">'
                      f'<title>{html.escape(name)}</title></circle>' for x, y in values]
        else:
            parts.append(f'<polyline fill="none" stroke="{colour}" points="{" ".join(at(x, y) for x, y in values)}"/>')
        parts.append(f'<text x="{plot - pad + 6}" y="{pad + 14 * i + 10}" font-size="10" fill="{colour}">{html.escape(name[-30:])}</text>')
    return "".join(parts) + "</svg>"


def render_html(runs: list[dict]) -> str:
    rows = {run["name"]: summary_row(run) for run in runs}
    columns = sorted({k for row in rows.values() for k in row})
    table = ("<table class='sortable'><thead><tr><th>run</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns)
             + "</tr></thead><tbody>" + "".join(
                 f"<tr><td>{html.escape(name)}</td>" + "".join(
                     f"<td>{row[c]:.4g}</td>" if c in row else "<td></td>" for c in columns) + "</tr>"
                 for name, row in rows.items()) + "</tbody></table>")
    reward_key = next((c for c in columns if c.startswith("reward_change/")), None)
    tradeoff = svg_plot({name: [(row.get(reward_key, 0.0), row.get("outside_psnr", 0.0))] for name, row in rows.items()},
                        f"{reward_key} (higher: target fixed)", "PSNR outside the mask, dB", dots=True) if reward_key else ""
    sections = []
    for run in runs:
        curves = "<div class='grid'>" + "".join(svg_plot({tag.removeprefix("train/"): points}, "step", tag.removeprefix("train/"))
                                                for tag, points in run["curves"].items()) + "</div>"
        cards = "".join(
            f"<figure><img src='data:image/png;base64,{s['png']}' alt='{html.escape(s['prompt'])}'>"
            f"<figcaption>{html.escape(s['prompt'])} (seed {s['seed']})<br>" + ", ".join(
                f"{html.escape(k)} {v:.3g}" for k, v in s.items() if k.startswith("reward_") or k == "mean_abs_change")
            + "</figcaption></figure>" for s in run["samples"])
        sections.append(f"<h2>{html.escape(run['name'])}</h2><h3>Training curves</h3>{curves}"
                        f"<h3>Samples: base | tuned | heatmap | mask | |tuned − base|×4</h3><div class='grid'>{cards}</div>")
    script = """document.querySelectorAll('table.sortable th').forEach((th, i) => th.onclick = () => {
  const body = th.closest('table').tBodies[0], rows = [...body.rows], up = th.dataset.up !== '1';
  rows.sort((a, b) => { const x = parseFloat(a.cells[i].textContent), y = parseFloat(b.cells[i].textContent);
    return (isNaN(x) || isNaN(y) ? a.cells[i].textContent.localeCompare(b.cells[i].textContent) : x - y) * (up ? 1 : -1); });
  th.dataset.up = up ? '1' : '0'; rows.forEach(r => body.appendChild(r)); });"""
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
             "padding:3px 6px;font-size:13px}th{cursor:pointer;background:#eee}.grid{display:flex;flex-wrap:wrap;gap:12px}"
             "figure{margin:0;width:330px;font-size:11px}figure img{width:320px;image-rendering:pixelated}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>fnf report</title><style>{style}</style></head>"
            f"<body><h1>fnf report</h1><p>Base = LoRA off, tuned = LoRA on, same x_T per (prompt, seed). "
            f"Click a column to sort.</p>{table}<h2>Trade-off across runs</h2>{tradeoff}{''.join(sections)}"
            f"<script>{script}</script></body></html>")


def write_report(run_dirs: list[Path], out: Path) -> Path:
    runs = [load_run(Path(d)) for d in run_dirs]
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({r["name"]: r["metrics"] for r in runs}, indent=2, sort_keys=True) + "\n")
    rows = {r["name"]: summary_row(r) for r in runs}
    columns = sorted({k for row in rows.values() for k in row})
    (out / "metrics.md").write_text(
        "| run | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n" + "".join(
            f"| {name} | " + " | ".join(f"{row[c]:.4g}" if c in row else "" for c in columns) + " |\n"
            for name, row in rows.items()))
    (out / "index.html").write_text(render_html(runs))
    return out / "index.html"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fnf report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (default_root_dir of fit / test)")
    parser.add_argument("--out", type=Path, default=Path("report"), help="output folder")
    args = parser.parse_args(argv)
    print(write_report(args.runs, args.out))
