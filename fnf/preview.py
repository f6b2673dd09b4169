"""``fnf preview --config X [--n 32] [--thresholds 0.3,0.5,0.7] [--out DIR]``: the masks training would use, before
training.

Builds the config's model exactly as ``fnf fit`` does (the same LightningCLI parser: every model / data / trainer
key and override works), samples the base images I0 (LoRA off) of the first ``n`` (prompt, seed) items of
``data.train_file``, and runs every reward head and the mask pipeline of training on them
(``FocusNFix._localise``: heatmap or saliency -> threshold -> dilation), once per threshold (``--thresholds``;
default: every threshold training uses, masks.threshold and the heads' own; each cuts every head's map). Writes
``DIR/index.html`` (one self-contained page: per prompt I0 | heatmap | mask per head and threshold | union mask,
with mask areas and base scores; per head and threshold a histogram of mask areas and the share of empty masks)
and ``DIR/summary.json`` with those numbers, so that masks.threshold / dilation / saliency can be judged first.
"""

from __future__ import annotations

import statistics
from argparse import ArgumentError
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from fnf.cli import FnfCLI
from fnf.compute import apply_compute
from fnf.data import PromptDataModule
from fnf.errors import check_config_files, parser_error
from fnf.masks import MaskArgs
from fnf.module import FocusNFix
from fnf.plugins import load_plugins
from fnf.output_folder import check_output_folder
from fnf.preview_page import MARKER, write_page
from fnf.sampling import initial_noise


@dataclass
class Preview:
    """Base images of the previewed items, and what the mask pipeline makes of them at each threshold."""

    prompts: list[str]
    seeds: list[int]
    images: Tensor  # (N, 3, H, W) I0 in [0, 1]
    heatmaps: Tensor  # (N, heads, H, W) heatmap or saliency the masks threshold; zeros for mask: none
    masks: Tensor  # (T, N, heads, H, W) before masks.empty applies; zeros for mask: none
    empty: Tensor  # (T, N, heads) bool: the mask is empty (masks.empty applies to it); False for mask: none
    scores: Tensor  # (N, heads) base rewards r_i(I0, c)
    thresholds: list[float]
    heads: list[str]
    sources: list[str]  # per head: heatmap | saliency | none
    mask_args: MaskArgs

    @property
    def masked(self) -> list[int]:
        """Indices of the heads that have a mask."""
        return [i for i, source in enumerate(self.sources) if source != "none"]

    def areas(self) -> Tensor:
        """(T, N, heads) mask area in % of the image (a soft mask counts its mean value)."""
        return 100 * self.masks.mean(dim=(-2, -1))

    def union_areas(self) -> Tensor:
        """(T, N) area in % of the union over the heads' masks (training's mask_mode: union)."""
        return 100 * self.masks.amax(dim=2).mean(dim=(-2, -1))


def parse_thresholds(text: str | None, defaults: list[float]) -> list[float]:
    """``"0.3,0.5,0.7"`` -> ascending thresholds in (0, 1]; None -> the ones training uses (``defaults``: the
    config's masks.threshold and each head's own)."""
    if text is None:
        return sorted(set(defaults))
    try:
        values = sorted({float(part) for part in text.split(",")})
    except ValueError:
        values = []
    if not values or not all(0 < value <= 1 for value in values):
        raise ValueError(f"--thresholds: expected comma-separated numbers in (0, 1] like 0.3,0.5,0.7, got {text!r}")
    return values


def head_heatmaps(model: FocusNFix, images: Tensor, prompts: list[str]) -> Tensor:
    """(B, heads, H, W) the map each head's mask thresholds (zeros for mask: none), for display."""
    heatmaps, _ = model.problem_heatmaps(images, prompts)
    zeros = images.new_zeros(images.shape[0], 1, *images.shape[2:])
    return torch.cat([zeros if h is None else h for h in heatmaps], dim=1).detach()


def masks_at(model: FocusNFix, images: Tensor, prompts: list[str], args: MaskArgs) -> tuple[Tensor, Tensor, Tensor]:
    """Training's masks M_i(I0) at ``args`` before masks.empty applies, which are empty, and the base scores.
    Run with masks.empty = skip: ``_localise`` then leaves the masks as they are and flags each empty one.
    ``args.threshold`` cuts every head's map, also of a head with its own threshold (one column, one cut)."""
    saved, model.mask_args = model.mask_args, replace(args, empty="skip")
    own = [term.threshold for term in model.terms]
    for term in model.terms:
        term.threshold = None
    try:
        masks, active, scores = model._localise(images, prompts)
    finally:
        model.mask_args = saved
        for term, threshold in zip(model.terms, own):
            term.threshold = threshold
    return masks, active == 0, scores


def preview_items(model: FocusNFix, items: list[dict], thresholds: list[float], batch_size: int) -> Preview:
    """I0 of each (prompt, seed) item from its x_T with the LoRA off, as training's base pass, and its masks."""
    parts = []
    for start in range(0, len(items), batch_size):
        prompts = [item["prompt"] for item in items[start:start + batch_size]]
        seeds = [item["seed"] for item in items[start:start + batch_size]]
        text, uncond = model._encode(prompts)
        noise = initial_noise(seeds, model.latent_shape, model.device)  # x_T, one generator per (prompt, seed)
        with torch.no_grad(), model.model.adapter_disabled():
            images = model.sampler(noise, text, uncond, "none").images  # (B, 3, H, W) I0
        per_threshold = [masks_at(model, images, prompts, replace(model.mask_args, threshold=t)) for t in thresholds]
        parts.append((prompts, seeds, images, head_heatmaps(model, images, prompts),
                      torch.stack([m for m, _, _ in per_threshold]), torch.stack([e for _, e, _ in per_threshold]),
                      per_threshold[0][2]))
    prompts, seeds, images, heatmaps, masks, empty, scores = zip(*parts)
    return Preview(prompts=sum(prompts, []), seeds=sum(seeds, []), images=torch.cat(images).float().cpu(),
                   heatmaps=torch.cat(heatmaps).float().cpu(), masks=torch.cat(masks, dim=1).float().cpu(),
                   empty=torch.cat(empty, dim=1).cpu(), scores=torch.cat(scores).float().cpu(), thresholds=thresholds,
                   heads=model.head_names, sources=[term.mask for term in model.terms],
                   mask_args=model.mask_args)


def _area_stats(areas: Tensor, empty: Tensor, bins: int = 12) -> dict:
    """Numbers of one (head or union, threshold): areas in %, empty masks, a histogram of the non-empty ones."""
    values = areas.tolist()
    filled = [a for a, e in zip(values, empty.tolist()) if not e]
    counts, edges = torch.histogram(torch.tensor(filled or [0.0]), bins=bins,
                                    range=(0.0, max(filled, default=0.0) or 1.0))
    return {"area_percent": values, "empty_per_item": empty.tolist(), "mean_area_percent": statistics.fmean(values),
            "median_area_percent": statistics.median(values), "empty": int(empty.sum()),
            "empty_fraction": float(empty.float().mean()),
            "histogram_of_non_empty": {"bin_edges_percent": edges.tolist(),
                                       "counts": counts.int().tolist() if filled else [0] * bins}}


def summary(preview: Preview, config: str, prompt_file: str) -> dict:
    """What summary.json holds: settings, per masked head (and their union) and threshold the area statistics,
    per prompt its seed and base scores."""
    areas, union = preview.areas(), preview.union_areas()
    heads = {name: {"mask": source} for name, source in zip(preview.heads, preview.sources)}
    for i in preview.masked:
        heads[preview.heads[i]]["thresholds"] = {str(t): _area_stats(areas[k, :, i], preview.empty[k, :, i])
                                                 for k, t in enumerate(preview.thresholds)}
    union_empty = preview.empty[:, :, preview.masked].all(dim=2)  # (T, N): every head's mask is empty
    return {"config": config, "prompt_file": prompt_file, "n": len(preview.prompts),
            "thresholds": preview.thresholds, "masks": asdict(preview.mask_args), "heads": heads,
            "union": {"thresholds": {str(t): _area_stats(union[k], union_empty[k])
                                     for k, t in enumerate(preview.thresholds)}} if preview.masked else {},
            "prompts": [{"prompt": p, "seed": s, "base_scores": dict(zip(preview.heads, scores))}
                        for p, s, scores in zip(preview.prompts, preview.seeds, preview.scores.tolist())]}


class PreviewCLI(FnfCLI):
    """``fnf fit``'s parser and model construction, plus the preview's own options; nothing runs."""

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--n", type=int, default=32, help="how many (prompt, seed) items of data.train_file")
        parser.add_argument("--thresholds", type=str | None, default=None,
                            help="comma-separated mask thresholds in (0, 1] side by side (default: masks.threshold)")
        parser.add_argument("--out", type=str, default="preview", help="output folder")

    thresholds: list[float]

    def parse_arguments(self, parser, args: list[str]) -> None:
        """LightningCLI's parse (without its warning that sys.argv holds more); unknown keys get suggestions."""
        try:
            self.config = parser.parse_args(args)
        except ArgumentError as error:  # no subcommands here: suggest among the top-level keys
            raise ValueError(parser_error(error, list(parser.get_defaults().keys()), args)) from None

    def before_instantiate_classes(self) -> None:
        """The preview's own options fail before the model is built."""
        super().before_instantiate_classes()
        if self.config.n < 1:
            raise ValueError(f"--n must be >= 1, got {self.config.n}")
        own = [term.threshold for term in self.config.model.rewards if term.get("threshold") is not None]
        self.thresholds = parse_thresholds(self.config.thresholds, [self.config.model.masks.threshold, *own])
        check_output_folder(Path(self.config.out), "--out", "fnf preview", MARKER)


def run_preview(argv: list[str]) -> tuple[Preview, dict, Path]:
    """Parse as ``fnf fit`` does, build the model, preview its masks, write the page: (preview, summary, page)."""
    load_plugins()  # installed heads and regularizers resolve by short name in YAML
    check_config_files(argv)
    cli = PreviewCLI(FocusNFix, PromptDataModule, args=argv, run=False,
                     parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False, "prog": "fnf preview",
                                    "description": __doc__.splitlines()[0]})
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    if data.train_file is None:
        raise ValueError("no prompts to preview: set data.train_file (or --data.train_file)")
    items = data.load_file("train_file")[:cli.config.n]
    if len(items) < cli.config.n:
        rank_zero_info(f"fnf preview: {data.train_file} holds {len(items)} (prompt, seed) items; previewing all of "
                       f"them (--n {cli.config.n} asked for more)")
    if trainer.world_size > 1:
        rank_zero_info(f"fnf preview: one process on {trainer.strategy.root_device} (the config's "
                       f"{trainer.world_size} processes are for fnf fit; {len(items)} items need no more)")
    # frozen weights in fit's dtype and layout (I0 and its masks as fit computes them; the memory fit needs), not
    # compiled: a preview of a few batches would spend longer compiling than sampling
    apply_compute(model.model, replace(model.compute, compile="none"), trainer)
    model.to(trainer.strategy.root_device).eval()
    with trainer.precision_plugin.forward_context():
        preview = preview_items(model, items, cli.thresholds, data.batch_size)
    configs = ", ".join(str(c) for c in (cli.config.get("config") or [])) or "(command line)"
    numbers = summary(preview, configs, data.train_file)
    return preview, numbers, write_page(preview, numbers, Path(cli.config.out))


def main(argv: list[str]) -> None:
    print(run_preview(argv)[2])
