"""``fnf validate`` / ``fnf test`` metrics: did the target improve, did anything else get worse?

Base images (LoRA off) and tuned images come from the same x_T per (prompt, seed), so every metric
compares the two models on identical starting noise:

* per reward head: mean score of base and tuned, and the change (the paper's table);
* FID between the tuned and the base images (how far the image distribution moved), with a
  configurable feature extractor (``fid_features``; the embedded world uses ShapesAlignment's tower);
* CLIP score of base and tuned images against their prompts (``clip``);
* preservation: PSNR, SSIM and (with ``lpips``) LPIPS of tuned vs base outside the problem mask, inside it, whole
  image. Two masks:
  ``outside_*`` / ``inside_*`` use the run's own training mask (its heads, threshold, dilation), so runs with
  different mask settings are scored on different pixels; ``reference_outside_*`` / ``reference_inside_*`` use
  ``reference`` (a heatmap head + mask settings on I0, the same for every run of one base model, prompts and
  seeds): the column to compare runs by. In the shapes world it is the judge's ground-truth problem mask;
* any ``judges`` (torchmetrics metrics with ``update(images, prompts)``), for base and tuned, and
  ``pair_judges`` (``update(base, tuned, prompts)``: e.g. whether the tuned image repaired the base's defect).

Every metric is a torchmetrics object, so values are exact under DDP. At the end of the stage, global
rank 0 writes ``<log dir>/<stage>_metrics.json`` and a markdown table beside it, and logs the table (and in
test the sample rows) to every logger of the run (fnf/image_logging.py). In test it also writes
``test_items.jsonl``: what each item contributes to the metrics (fnf.item_metrics), for item-by-item comparisons
of runs (fnf.paired, ``fnf report``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.image.fid import FrechetInceptionDistance
from torchvision.utils import make_grid, save_image
from typing_extensions import override

from fnf.files import atomic_path, write_text_atomically
from fnf.image_logging import log_image, log_table
from fnf.item_metrics import item_rows
from fnf.masks import MaskArgs, heatmap_to_mask
from fnf.metrics import CLIPScore, ImageFeatures, MaskedLPIPS, MaskedPSNR, MaskedSSIM, RegionMean, lpips_network
from fnf.rewards.base import RewardHead

REGIONS = ("outside", "inside", "all")
MASKS_NOTE = ("Preservation (tuned vs base): outside_* / inside_* use this run's own training mask; reference_* use "
              "the Evaluation callback's reference mask, the same pixels for every compared run; all_* the whole "
              "image. A region without pixels (every mask empty: nothing inside), a judge's rate of no images (no "
              "base image had the problem), or FID of fewer than 2 images has no row.\n\n")


@dataclass
class ReferenceMask:
    """A problem mask of the base image I0 that no run chooses: preservation outside it compares runs on the
    same pixels (a run's own mask depends on its threshold, dilation and heads)."""

    head: RewardHead
    """Its heatmap on I0 localises the problem (shapes world: fnf.worlds.shapes.judge.JudgeProblemMask)."""
    masks: MaskArgs = field(default_factory=lambda: MaskArgs(threshold=0.5, dilation=2))
    """Heatmap -> mask (threshold, dilation); the empty-mask policy does not apply."""


def sample_row(sample: dict) -> Tensor:
    """(3, H + 2, 5W + 6): base | tuned | heatmap | mask | |tuned − base|×4 with 1-pixel padding."""
    base, tuned, heatmap, mask = sample["images"]
    difference = ((tuned - base).abs() * 4).clamp(0, 1)
    return make_grid(torch.stack([base, tuned, heatmap, mask, difference]), nrow=5, padding=1)


def write_samples(samples: list[dict], head_names: list[str], folder: Path) -> None:
    """``NNN.png`` rows (``sample_row``) and ``samples.json`` with their numbers."""
    folder.mkdir(parents=True, exist_ok=True)
    index = []
    for n, sample in enumerate(samples):
        base, tuned = sample["images"][:2]
        with atomic_path(folder / f"{n:03d}.png") as staging:
            save_image(sample_row(sample), staging, format="PNG")
        index.append({"image": f"{n:03d}.png", "prompt": sample["prompt"], "seed": sample["seed"],
                      "mean_abs_change": float((tuned - base).abs().mean()),
                      **{f"reward_base/{h}": b for h, b in zip(head_names, sample["reward_base"])},
                      **{f"reward_tuned/{h}": t for h, t in zip(head_names, sample["reward_tuned"])}})
    write_text_atomically(folder / "samples.json", json.dumps(index, indent=1) + "\n")


def gathered(trainer: Trainer, samples: list[dict]) -> list[dict]:
    """Every rank's samples on rank 0 (a collective), in the prompt file's order: rank r of W evaluates items r,
    r + W, r + 2W, ... (fnf.data: unrepeated), so its j-th sample is item j·W + r."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return samples
    parts = [None] * trainer.world_size if trainer.is_global_zero else None
    torch.distributed.gather_object(samples, parts, dst=0)
    if not trainer.is_global_zero:
        return []
    return [part[j] for j in range(max(map(len, parts))) for part in parts if j < len(part)]


def base_heatmap(pl_module: LightningModule, images: Tensor, prompts: list[str]) -> Tensor:
    """(B, 1, H, W) max over the masked reward terms of their heatmap (or saliency) on the base images."""
    heatmaps, _ = pl_module.problem_heatmaps(images, prompts)
    zeros = images.new_zeros(images.shape[0], 1, *images.shape[2:])
    return torch.stack([zeros] + [h for h in heatmaps if h is not None]).amax(0)


class Evaluation(Callback):
    def __init__(self, clip: nn.Module | None = None, fid_features: nn.Module | None = None,
                 judges: list[Metric] | None = None, pair_judges: list[Metric] | None = None,
                 reference: ReferenceMask | None = None, lpips: Literal["alex", "vgg", "squeeze"] | None = None,
                 output_dir: str | None = None, save_samples: int = 16) -> None:
        """Evaluate base vs tuned images in validate/test.

        Args:
            clip: model with ``image_features`` / ``text_features`` (e.g. ShapesAlignment) for CLIP score;
                None skips CLIP score.
            fid_features: FID feature extractor: a module mapping images in [0, 1] to (B, D) features, or a
                CLIP-like model (its image tower is used). None skips FID.
            judges: extra metrics updated with (images, prompts), e.g. the shapes world's JudgeRates; one that
                defines ``items(images, prompts)`` (per image, the values its rates are means of) also gets
                its columns in ``test_items.jsonl``.
            pair_judges: extra metrics updated with (base images, tuned images, prompts), e.g. JudgeRepairRates.
            reference: the mask for the ``reference_*`` preservation metrics; None: only the run's own mask.
            lpips: LPIPS backbone for the ``*_lpips`` preservation metrics (a distance: lower is better; the paper's
                perceptual check outside the mask); torchvision's ImageNet weights from torch's hub cache
                (``$TORCH_HOME/hub/checkpoints``, downloaded once where online). None skips LPIPS.
            output_dir: where ``<stage>_metrics.json`` / ``.md`` go; None means the run's log dir.
            save_samples: in test, keep this many (prompt, seed) samples for ``fnf report``: PNGs of
                base | tuned | heatmap | mask | |difference| and their numbers in ``test_samples/``.
        """
        self.clip, self.fid_features, self.judges, self.output_dir = clip, fid_features, judges or [], output_dir
        self.pair_judges, self.reference = pair_judges or [], reference
        self.lpips_backbone, self.lpips = lpips, None  # the network: built in setup, one for every region and group
        self.save_samples = save_samples
        self.metrics: dict[str, dict[str, nn.ModuleDict]] = {}  # stage -> category ('' = all) -> metrics
        self.samples: list[dict] = []
        self.items: list[dict] = []  # test: one row per item (fnf.item_metrics), written as test_items.jsonl

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """LPIPS's network, whose ImageNet weights must be in the hub cache, for a run that evaluates: before its
        first step, but not for a fit that never validates (no validation prompts, or limit_val_batches 0)."""
        if self.lpips_backbone is None or self.lpips is not None:
            return
        items = getattr(getattr(trainer, "datamodule", None), "items", None)  # fnf's PromptDataModule, set up
        validates = trainer.limit_val_batches != 0 and (items is None or "val" in items)
        if stage != "fit" or validates:
            self.lpips = lpips_network(self.lpips_backbone)

    def _build(self, pl_module: LightningModule, fid: bool) -> nn.ModuleDict:
        masks = ["", "reference_"] if self.reference is not None else [""]
        kinds = {"psnr": MaskedPSNR, "ssim": MaskedSSIM}
        if self.lpips is not None:
            kinds["lpips"] = partial(MaskedLPIPS, self.lpips)
        metrics = {f"{mask}{region}_{name}": kind(region=region) for mask in masks for region in REGIONS
                   if not (mask and region == "all") for name, kind in kinds.items()}
        for name in pl_module.head_names:
            metrics[f"reward_base/{name}"], metrics[f"reward_tuned/{name}"] = MeanMetric(), MeanMetric()
        if self.clip is not None:
            metrics["clip_score_base"], metrics["clip_score_tuned"] = CLIPScore(self.clip), CLIPScore(self.clip)
        if fid and self.fid_features is not None:
            features = self.fid_features if not hasattr(self.fid_features, "image_features") else ImageFeatures(
                self.fid_features)
            metrics["fid_tuned_vs_base"] = FrechetInceptionDistance(feature=features, normalize=True)
        for i, judge in enumerate(self.judges):
            metrics[f"judge{i}_base"], metrics[f"judge{i}_tuned"] = judge.clone(), judge.clone()
        for i, judge in enumerate(self.pair_judges):
            metrics[f"pair_judge{i}_tuned"] = judge.clone()
        return nn.ModuleDict(metrics).to(pl_module.device)

    def _update(self, stage: str, pl_module: LightningModule, outputs: dict | None, batch: dict) -> dict | None:
        """Update the overall metrics and, when the prompt file has categories, each category's (no FID); the
        outputs with the reference mask."""
        if not outputs:
            return None
        groups = self.metrics.setdefault(stage, {})
        if self.reference is not None:
            heatmap = self.reference.head.to(outputs["base"].device)(outputs["base"], outputs["prompts"]).heatmap
            outputs = {**outputs, "reference_mask": heatmap_to_mask(heatmap, self.reference.masks)}
        categories = batch.get("category") or [""] * len(outputs["prompts"])
        for group in dict.fromkeys(["", *categories]):
            if group not in groups:
                groups[group] = self._build(pl_module, fid=group == "")
            if group == "":  # the whole batch: no copy
                self._update_group(groups[group], pl_module, outputs)
                continue
            keep = [i for i, c in enumerate(categories) if c == group]
            subset = {k: v[keep] if isinstance(v, torch.Tensor) else [v[i] for i in keep]
                      for k, v in outputs.items() if k != "loss"}
            self._update_group(groups[group], pl_module, subset)
        return outputs

    @staticmethod
    def _update_group(metrics: nn.ModuleDict, pl_module: LightningModule, outputs: dict) -> None:
        prompts = outputs["prompts"]
        base, tuned, mask = outputs["base"].float(), outputs["tuned"].float(), outputs["mask"].float()
        for name, metric in metrics.items():
            if name.startswith("reference_"):
                metric.update(tuned, base, outputs["reference_mask"].float())
            elif name.endswith(("_psnr", "_ssim", "_lpips")):
                metric.update(tuned, base, mask)
            elif name.startswith("pair_judge"):
                metric.update(base, tuned, prompts)
            elif name.startswith("reward_"):
                head = pl_module.head_names.index(name.split("/", 1)[1])
                metric.update(outputs["base_scores" if name.startswith("reward_base") else "scores"][:, head])
            elif name == "fid_tuned_vs_base":
                metric.update(base, real=True)
                metric.update(tuned, real=False)
            else:  # clip_score_* and judge*_*: (images, prompts) of one model
                metric.update(base if name.endswith("_base") else tuned, prompts)

    def _finish(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        if stage not in self.metrics:
            return
        values: dict[str, float] = {}
        for group, metrics in self.metrics.pop(stage).items():
            prefix = f"category/{group}/" if group else ""
            for name, metric in metrics.items():
                try:
                    value = metric.compute()
                except RuntimeError as error:  # torchmetrics' FID of fewer than 2 images (data.val_items 1): no row
                    if not isinstance(metric, FrechetInceptionDistance):
                        raise
                    rank_zero_warn(f"{stage}: no {name}: {error}")
                    continue
                if isinstance(metric, RegionMean) and math.isnan(value):  # a region without pixels: no number
                    continue
                if isinstance(value, dict):  # a judge: its own keys, suffixed with the model; a rate of nothing: none
                    values |= {f"{prefix}{key}_{name.rsplit('_', 1)[1]}": float(v) for key, v in value.items()
                               if not math.isnan(v)}
                else:
                    values[prefix + name] = float(value)
            for head in pl_module.head_names:
                values[f"{prefix}reward_change/{head}"] = (values[f"{prefix}reward_tuned/{head}"]
                                                           - values[f"{prefix}reward_base/{head}"])
        pl_module.log_dict({f"{stage}_eval/{k}": v for k, v in values.items()}, sync_dist=False)
        folder = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)  # log_dir: all ranks
        samples = gathered(trainer, self.samples)[:self.save_samples] if stage == "test" else []  # all ranks
        if stage == "test" and trainer.is_global_zero:
            write_samples(samples, pl_module.head_names, folder / "test_samples")
            for n, sample in enumerate(samples):  # and to the run's loggers (W&B, MLflow, ...)
                log_image(trainer, f"test_samples/{n:03d}", sample_row(sample), trainer.global_step)
        items = gathered(trainer, self.items) if stage == "test" else []  # all ranks
        self.samples, self.items = [], []
        if trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            if stage == "test":
                write_text_atomically(folder / "test_items.jsonl", "".join(json.dumps(row) + "\n" for row in items))
            rows = "".join(f"| {k} | {v:.4f} |\n" for k, v in sorted(values.items()))
            write_text_atomically(folder / f"{stage}_metrics.md", MASKS_NOTE + "| metric | value |\n|---|---|\n" + rows)
            # last: a folder with <stage>_metrics.json holds the stage's every file (fnf report reads test runs by it)
            write_text_atomically(folder / f"{stage}_metrics.json", json.dumps(values, indent=2, sort_keys=True) + "\n")
            log_table(trainer, f"{stage}_metrics", ["metric", "value"], [[k, v] for k, v in sorted(values.items())],
                      trainer.global_step)

    def _start(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        """Create every group up front, in the same order on every rank (metric syncs must match under DDP)."""
        split = {"validate": "val", "test": "test"}[stage]
        items = getattr(getattr(trainer, "datamodule", None), "items", {}).get(split, [])
        categories = sorted({item["category"] for item in items if item.get("category")})
        self.metrics[stage] = {group: self._build(pl_module, fid=group == "") for group in ["", *categories]}

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._start("validate", trainer, pl_module)

    @override
    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start("test", trainer, pl_module)

    @override
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._update("validate", pl_module, outputs, batch)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish("validate", trainer, pl_module)

    @override
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        outputs = self._update("test", pl_module, outputs, batch)
        if outputs:
            self.items += item_rows(outputs, batch, pl_module.head_names, self.judges)
        quota = -(-self.save_samples // trainer.world_size)  # this rank's share of the first save_samples items
        if outputs and len(self.samples) < quota:
            keep = min(quota - len(self.samples), len(outputs["prompts"]))
            heatmap = base_heatmap(pl_module, outputs["base"][:keep], outputs["prompts"][:keep])
            for i in range(keep):
                self.samples.append({
                    "prompt": outputs["prompts"][i], "seed": int(batch["seed"][i]),
                    "reward_base": outputs["base_scores"][i].tolist(), "reward_tuned": outputs["scores"][i].tolist(),
                    "images": torch.stack([t.float().cpu().expand(3, -1, -1) for t in (
                        outputs["base"][i], outputs["tuned"][i], heatmap[i], outputs["mask"][i])]),
                })

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish("test", trainer, pl_module)

