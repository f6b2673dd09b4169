"""What a run leaves behind: image grids in every configured logger, the exported LoRA, PNGs from ``fnf predict``."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from torchvision.utils import make_grid, save_image
from typing_extensions import override

from fnf.checkpoint_io import check_writable
from fnf.export import lora_state_dict, save_lora
from fnf.image_logging import log_image


class ImageGridLogger(Callback):
    """Every ``every_n_steps`` training steps: rows of base | tuned | mask overlay | |difference| ×4, to every
    logger of the run (TensorBoard, W&B, MLflow; PNG files beside the metrics for CSV and other loggers)."""

    def __init__(self, every_n_steps: int = 50, max_images: int = 4) -> None:
        """Log image grids to the run's loggers during fit.

        Args:
            every_n_steps: log every this many optimizer steps.
            max_images: images (rows) per grid.
        """
        self.every_n_steps, self.max_images = every_n_steps, max_images

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        if not outputs or trainer.global_step % self.every_n_steps or not trainer.loggers:
            return
        tuned = outputs["tuned"][: self.max_images].float().cpu()
        if "base" not in outputs:  # model.train_base: if_needed skipped I0 (plain DRaFT)
            log_image(trainer, "train/tuned", make_grid(tuned, nrow=len(tuned)), trainer.global_step)
            return
        base, mask = (outputs[k][: self.max_images].float().cpu() for k in ("base", "mask"))
        overlay = base * (1 - 0.5 * mask) + 0.5 * mask * torch.tensor([1.0, 0.0, 0.0])[:, None, None]
        difference = ((tuned - base).abs() * 4).clamp(0, 1)
        rows = torch.stack([base, tuned, overlay, difference], dim=1).flatten(0, 1)  # (n, 4, 3, H, W) -> (4n, 3, H, W)
        log_image(trainer, "train/base|tuned|mask|diff", make_grid(rows, nrow=4), trainer.global_step)


class LoraExporter(Callback):
    """At the end of fit, writes the LoRA in diffusers format (``load_lora_weights``) to ``dirpath``."""

    def __init__(self, dirpath: str | None = None) -> None:
        """Export the trained LoRA as safetensors.

        Args:
            dirpath: output folder; None means ``<log dir>/lora``.
        """
        self.dirpath = dirpath

    def directory(self, trainer: Trainer) -> Path:
        return Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "lora")  # all ranks: a broadcast

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":  # an unwritable folder found now, not after the run
            directory = self.directory(trainer)  # every rank: trainer.log_dir is a collective
            if trainer.is_global_zero:
                check_writable(directory, "lora_export.dirpath")

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        directory = self.directory(trainer)
        weights = lora_state_dict(pl_module.model)  # all ranks: gathers the shards under FSDP2
        if trainer.is_global_zero:
            save_lora(pl_module.model, directory, weights)


class PngWriter(BasePredictionWriter):
    """Writes ``<output_dir>/{tuned,base}/<batch>_<item>_<seed>.png`` and a prompts.tsv index."""

    def __init__(self, output_dir: str = "predictions") -> None:
        """Write predicted images as PNG files.

        Args:
            output_dir: folder for tuned/, base/ and prompts.tsv.
        """
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        check_writable(self.output_dir, "predict_writer.output_dir")
        for kind in ("tuned", "base"):
            (self.output_dir / kind).mkdir(parents=True, exist_ok=True)
        (self.output_dir / "prompts.tsv").write_text("file\tseed\tprompt\n", encoding="utf-8")  # a fresh index per run

    @override
    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        with open(self.output_dir / "prompts.tsv", "a", encoding="utf-8") as index:
            for i, (prompt, seed) in enumerate(zip(prediction["prompt"], prediction["seed"])):
                name = f"{batch_idx:04d}_{i:02d}_{seed}.png"
                for kind in ("tuned", "base"):
                    save_image(prediction[kind][i], self.output_dir / kind / name)
                index.write(f"{name}\t{seed}\t{prompt}\n")
