"""RAHF training (Liang et al., CVPR 2024, Sec. 4) as a LightningModule.

    loss = heatmap_weight · Σ_h MSE(ĥ, h) + score_weight · Σ_s MSE(ŝ, s)

over the two heatmaps h ∈ {implausibility, misalignment} (pixel-wise MSE) and the four scores s ∈ {plausibility,
alignment, aesthetics, overall} (paper: MSE for both; its keyword-sequence loss is not implemented). At the end
of ``fit`` the weights are written as ``.safetensors`` (atomically), ready for ``fnf.rewards.rahf.RAHFHeatmap``.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from typing_extensions import override

from fnf.rahf.metrics import HeatmapMetrics, score_metrics
from fnf.rewards.rahf import HEATMAPS, RAHF, SCORES, RAHFConfig, load_rahf, save_rahf, tokenize


class RAHFTraining(L.LightningModule):
    """Trains a multi-head RAHF on RichHF-18K-format data (``fnf.rahf.data``)."""

    def __init__(self, config: RAHFConfig = RAHFConfig(), heatmap_weight: float = 1.0, score_weight: float = 1.0,
                 optimizer: OptimizerCallable = torch.optim.AdamW, lr_scheduler: LRSchedulerCallable | None = None,
                 init_weights: str | None = None, output: str | None = None) -> None:
        """Train RAHF from scratch or from init_weights.

        Args:
            config: model sizes; with init_weights they must equal the sizes stored in that file.
            heatmap_weight: weight of the summed heatmap MSEs in the loss.
            score_weight: weight of the summed score MSEs in the loss.
            optimizer: optimizer over all RAHF parameters (paper: AdamW, lr 0.015 at batch 256, 20K steps).
            lr_scheduler: optional learning-rate schedule, stepped every optimizer step.
            init_weights: start from these RAHF ``.safetensors`` weights instead of a random init.
            output: where ``fit`` writes the trained weights; None = ``<log dir>/rahf.safetensors``.
        """
        super().__init__()
        if heatmap_weight < 0 or score_weight < 0 or heatmap_weight + score_weight == 0:
            raise ValueError("model.heatmap_weight and model.score_weight must be >= 0 and not both 0")
        if output is not None and Path(output).suffix != ".safetensors":
            raise ValueError(f"model.output: {output} must end in .safetensors")
        self.save_hyperparameters(dict(config=asdict(config), heatmap_weight=heatmap_weight, score_weight=score_weight,
                                       init_weights=init_weights))  # plain types: checkpoints load with weights_only
        self.model = load_rahf(init_weights, config) if init_weights else RAHF(config)
        self.heatmap_weight, self.score_weight, self.output = heatmap_weight, score_weight, output
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.heatmap_metrics = torch.nn.ModuleDict({f"{stage}_{name}": HeatmapMetrics()
                                                    for stage in ("val", "test") for name in HEATMAPS})
        self.score_metrics = torch.nn.ModuleDict({stage: score_metrics(SCORES) for stage in ("val", "test")})

    @override
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "train")

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "val")

    @override
    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "test")

    def _common_step(self, batch: dict, stage: str) -> torch.Tensor:
        tokens = tokenize(batch["prompts"], self.model.config.context_length).to(self.device)
        output = self.model(batch["images"], tokens)
        logs = {}
        for name in HEATMAPS:
            pred, gt = output.heatmaps[name], batch["heatmaps"][name]  # (B, 1, S, S)
            if gt.shape[-2:] != pred.shape[-2:]:
                gt = F.interpolate(gt, size=pred.shape[-2:], mode="bilinear", align_corners=False, antialias=True)
            logs[f"{stage}/loss_{name}"] = F.mse_loss(pred, gt)
            if stage != "train":
                self.heatmap_metrics[f"{stage}_{name}"].update(pred, gt)
        for name in SCORES:
            pred, target = output.scores[name], batch["scores"][name].to(output.scores[name].dtype)
            logs[f"{stage}/loss_{name}"] = F.mse_loss(pred, target)
            if stage != "train":
                self.score_metrics[stage][name].update(pred.detach().float(), target.float())
        heatmap_loss = sum(logs[f"{stage}/loss_{name}"] for name in HEATMAPS)
        score_loss = sum(logs[f"{stage}/loss_{name}"] for name in SCORES)
        loss = self.heatmap_weight * heatmap_loss + self.score_weight * score_loss
        logs |= {f"{stage}/heatmap_loss": heatmap_loss, f"{stage}/score_loss": score_loss}
        batch_size = len(batch["prompts"])
        self.log_dict(logs, batch_size=batch_size, sync_dist=stage != "train")
        self.log(f"{stage}/loss", loss, batch_size=batch_size, prog_bar=True, sync_dist=stage != "train")
        return loss

    def _log_metrics(self, stage: str) -> None:
        """Heatmap metrics per map and PLCC / SRCC per score, as ``{stage}/{metric}_{name}``."""
        logs = {}
        for name in HEATMAPS:
            metric = self.heatmap_metrics[f"{stage}_{name}"]
            logs |= {f"{stage}/{key}_{name}": value for key, value in metric.compute().items()}
            metric.reset()
        for name, collection in self.score_metrics[stage].items():
            if collection["plcc"].update_count > 0:
                logs |= {f"{stage}/{key}_{name}": value for key, value in collection.compute().items()}
            collection.reset()
        self.log_dict(logs)

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    @override
    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    @override
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.model.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.lr_scheduler_factory(optimizer), "interval": "step"}}

    def output_path(self) -> Path:
        if self.output is not None:
            return Path(self.output)
        return Path(self.trainer.log_dir or self.trainer.default_root_dir) / "rahf.safetensors"

    @override
    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero:
            save_rahf(self.model, self.output_path())  # temp file beside the target, then os.replace
