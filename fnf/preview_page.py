"""The page of ``fnf preview``: one self-contained HTML file (images as PNG data URIs, charts as inline SVG) and
``summary.json`` beside it. What is computed lives in fnf/preview.py; this file only shows it."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from fnf.charts import histogram, to_svg
from fnf.output_folder import write_text_folder
from fnf.report import compact

if TYPE_CHECKING:  # fnf.preview imports this module
    from fnf.preview import Preview

THUMBNAIL = 256  # px: larger images are downscaled before they are embedded (the page shows them at 128 px)
DIM = 0.3  # brightness of the pixels outside a mask in its overlay
EMPTY_POLICY = {"keep": "its reward stays on and the whole image is preserved",
                "skip": "its reward is switched off for that image",
                "global": "the whole image may change"}
STYLE = """body{font-family:sans-serif;margin:1.5em 2em;max-width:1600px}
table{border-collapse:collapse;font-size:12px;font-variant-numeric:tabular-nums}
td,th{border:1px solid #ccc;padding:3px 6px}th{background:#eee}td{text-align:right}td.name{text-align:left}
p.note{color:#444;font-size:13px;max-width:1200px}
.grid{display:flex;flex-wrap:wrap;gap:12px}.cells{display:flex;flex-wrap:wrap;gap:6px}
section.item{border-top:1px solid #ddd;padding:6px 0}section.item h3{font-size:14px;margin:4px 0}
section.item p{font-size:12px;margin:2px 0 6px;color:#333}
figure{margin:0;width:132px;font-size:11px}figure img{width:128px;height:auto}img.small{image-rendering:pixelated}
figure.chart{width:auto}"""


def _png(rgb: Tensor) -> str:
    """(3, H, W) in [0, 1] -> base64 PNG, at most ``THUMBNAIL`` px on a side."""
    side = max(rgb.shape[-2:])
    if side > THUMBNAIL:
        rgb = F.interpolate(rgb[None], scale_factor=THUMBNAIL / side, mode="area")[0]
    pixels = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (3, H, W) -> (H, W, 3)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _cell(rgb: Tensor, caption: str, alt: str) -> str:
    small = " class='small'" if max(rgb.shape[-2:]) < 128 else ""  # upscaled: keep the pixels square
    return (f"<figure><img{small} src='data:image/png;base64,{_png(rgb)}' alt='{html.escape(alt)}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _heatmap_rgb(heatmap: Tensor) -> Tensor:
    """(H, W) in [0, 1] -> (3, H, W) magma colours (dark: nothing, bright: a problem)."""
    return torch.from_numpy(matplotlib.colormaps["magma"](heatmap.numpy())[..., :3]).permute(2, 0, 1).float()


def _overlay(image: Tensor, mask: Tensor) -> Tensor:
    """I0 at full brightness where the (H, W) mask lets it change, dimmed where it is kept."""
    return image * (DIM + (1 - DIM) * mask)


def _item(preview: Preview, n: int) -> str:
    """One previewed (prompt, seed): I0 | per masked head its map and its mask at each threshold | union."""
    image, thresholds, areas = preview.images[n], preview.thresholds, preview.areas()[:, n]
    cells = [_cell(image, "I0 (base model)", preview.prompts[n])]
    for i in preview.masked:
        head = preview.heads[i]
        cells.append(_cell(_heatmap_rgb(preview.heatmaps[n, i]), f"{head} {preview.sources[i]}", f"{head} map"))
        cells += [_cell(_overlay(image, preview.masks[k, n, i]),
                        f"{head} mask, threshold {t}: " + ("empty" if preview.empty[k, n, i] else
                                                             f"{compact(float(areas[k, i]))}%"), f"{head} mask")
                  for k, t in enumerate(thresholds)]
    if len(preview.masked) > 1:
        union = preview.union_areas()[:, n]
        cells += [_cell(_overlay(image, preview.masks[k, n].amax(0)),
                        f"union, threshold {t}: {compact(float(union[k]))}%", "union mask")
                  for k, t in enumerate(thresholds)]
    scores = "; ".join(f"{head} {compact(score)}" for head, score in zip(preview.heads, preview.scores[n].tolist()))
    return (f"<section class='item'><h3>#{n} {html.escape(preview.prompts[n])} (seed {preview.seeds[n]})</h3>"
            f"<p>base scores: {html.escape(scores)}</p><div class='cells'>{''.join(cells)}</div></section>")


def _stats_rows(name: str, source: str, per_threshold: dict, n: int) -> str:
    return "".join(
        f"<tr><td class='name'>{html.escape(name)}</td><td class='name'>{source}</td><td>{t}</td>"
        f"<td>{compact(s['mean_area_percent'])}</td><td>{compact(s['median_area_percent'])}</td>"
        f"<td>{s['empty']} of {n} ({compact(100 * s['empty_fraction'])}%)</td></tr>"
        for t, s in per_threshold.items())


def _histogram(name: str, per_threshold: dict, n: int) -> str:
    """Areas of the non-empty masks, one bar colour per threshold; the legend counts the empty ones."""
    samples = {f"threshold {t}: {s['empty']} of {n} empty": [a for a, e in zip(s["area_percent"], s["empty_per_item"])
                                                             if not e] for t, s in per_threshold.items()}
    top = max((a for values in samples.values() for a in values), default=0.0) or 1.0
    bins = torch.linspace(0, top * 1.0001, 13).tolist()  # 12 bins shared by the thresholds
    figure = histogram(samples, bins, f"{name}: mask area (% of the image)", "images (non-empty masks)")
    return f"<figure class='chart'>{to_svg(figure, f'areas {name}')}</figure>"


def render_html(preview: Preview, numbers: dict) -> str:
    n, args = numbers["n"], preview.mask_args
    groups = {name: head["thresholds"] for name, head in numbers["heads"].items() if "thresholds" in head}
    if len(groups) > 1:
        groups["union"] = numbers["union"]["thresholds"]
    sources = {name: head["mask"] for name, head in numbers["heads"].items()} | {"union": "max over heads"}
    rows = "".join(_stats_rows(name, sources[name], per_threshold, n) for name, per_threshold in groups.items())
    settings = (f"config {numbers['config']}; prompts: the first {n} (prompt, seed) items of {numbers['prompt_file']}; "
                f"masks: dilation {args.dilation} px, kind {args.kind}, saliency_sigma {args.saliency_sigma}; "
                f"empty masks: masks.empty = {args.empty}, so in training {EMPTY_POLICY[args.empty]}.")
    without = [h for h, s in zip(preview.heads, preview.sources) if s == "none"]
    note = f" Heads without a mask (reward only): {', '.join(without)}." if without else ""
    table = (f"<table><tr><th>head</th><th>mask from</th><th>threshold</th><th>mean area, % (empty: 0)</th>"
             f"<th>median area, %</th><th>empty masks</th></tr>{rows}</table>" if groups else
             "<p class='note'>No head has a mask (every reward term has mask: none).</p>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>fnf preview</title><style>{STYLE}</style>"
            f"</head><body><h1>fnf preview: masks before training</h1><p class='note'>{html.escape(settings + note)}"
            f" I0 is the base model's image (LoRA off) from the item's x_T, as in training. Mask overlays: bright = "
            f"may change, dimmed = kept (before masks.empty applies). Areas in % of the image.</p>{table}"
            f"<div class='grid'>{''.join(_histogram(name, t, n) for name, t in groups.items())}</div>"
            f"<h2>Items</h2>{''.join(_item(preview, i) for i in range(len(preview.prompts)))}</body></html>")


MARKER = "fnf_preview.json"  # what the page previews; only a folder holding it is replaced


def write_page(preview: Preview, numbers: dict, out: Path) -> Path:
    """``out/summary.json`` and ``out/index.html``, written whole (``out`` replaced); returns the page's path."""
    write_text_folder(out, {
        "index.html": render_html(preview, numbers), "summary.json": json.dumps(numbers, indent=1) + "\n",
        MARKER: json.dumps({key: numbers[key] for key in ("config", "prompt_file", "n")}, indent=1) + "\n"})
    return out / "index.html"
