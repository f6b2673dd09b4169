"""What a run leaves behind: image grids in every configured logger, the exported LoRA, PNGs from ``fnf predict``."""

from __future__ import annotations

import csv
import io
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torchvision.utils import make_grid, save_image
from typing_extensions import override

from fnf.evaluation import gathered
from fnf.export import WEIGHT_NAME, lora_state_dict, save_lora
from fnf.files import atomic_path, write_text_atomically
from fnf.image_logging import log_image
from fnf.output_folder import check_output_folder


class ImageGridLogger(Callback):
    """Every ``every_n_steps`` training steps: rows of base | tuned | mask overlay | |difference| ×4, to every
    logger of the run (TensorBoard, W&B, MLflow; PNG files beside the metrics for CSV and other loggers)."""

    def __init__(self, every_n_steps: int = 50, max_images: int = 4) -> None:
        """Log image grids to the run's loggers during fit.

        Args:
            every_n_steps: log every this many optimizer steps.
            max_images: images (rows) per grid.
        """
        for key, value in (("every_n_steps", every_n_steps), ("max_images", max_images)):
            if value < 1:
                raise ValueError(f"image_logger.{key} must be >= 1, got {value}")
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
        self.run_folder: Path | None = None  # set by fnf where the first logger's log dir is not the run's folder

    def directory(self, trainer: Trainer) -> Path:
        return Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "lora")  # all ranks: a broadcast

    @staticmethod
    def run_folders(trainer: Trainer) -> dict[str, str | None]:
        """The folders the export may not replace; all ranks (``trainer.log_dir`` is a broadcast)."""
        return {"trainer.default_root_dir": trainer.default_root_dir, "the run's log dir": trainer.log_dir}

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":  # an unwritable or foreign folder found now, not after the run
            directory, run_folders = self.directory(trainer), self.run_folders(trainer)  # every rank: collectives
            on_every_rank(trainer, lambda: check_lora_folder(directory, run_folders))

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        directory, run_folders = self.directory(trainer), self.run_folders(trainer)
        weights = lora_state_dict(pl_module.model)  # all ranks: gathers the shards under FSDP2
        on_every_rank(trainer, lambda: check_lora_folder(directory, run_folders))  # written to since setup?
        if trainer.is_global_zero:
            save_lora(pl_module.model, directory, weights)
            run = self.run_folder or run_folders["the run's log dir"] or trainer.default_root_dir  # log_dir: read above
            rank_zero_info(f"fnf: run folder {run}; LoRA (diffusers load_lora_weights) in {directory}")


def on_every_rank(trainer: Trainer, check: Callable[[], None]) -> None:
    """Run ``check`` on rank 0 and raise its error on every rank: an error on rank 0 alone would leave the other
    ranks waiting in their next collective until it times out."""
    problem = None
    if trainer.is_global_zero:
        try:
            check()
        except (ValueError, OSError) as error:
            problem = str(error)
    problem = trainer.strategy.broadcast(problem)
    if problem is not None:
        raise ValueError(problem)


def check_lora_folder(directory: Path, run_folders: dict[str, str | None]) -> None:
    """The export replaces ``directory`` whole: it must be new, empty or an earlier LoRA export (its one file), and
    hold none of this run's own folders (``run_folders``: what -> path; they may not exist yet when checked)."""
    for key, folder in run_folders.items():
        if folder and Path(folder).resolve().is_relative_to(directory.resolve()):
            raise ValueError(f"lora_export.dirpath: {directory} holds {key} {folder}; the export replaces the folder "
                             "whole: choose a folder of its own")
    check_output_folder(directory, "lora_export.dirpath", "fnf's LoRA export", WEIGHT_NAME, names={WEIGHT_NAME})


class PngWriter(BasePredictionWriter):
    """Writes ``<output_dir>/{tuned,base}/<item>_<seed>.png`` and, at the end, a prompts.tsv index of every rank's
    images. ``<item>`` is the item's place in the prompt file (its seeds expanded), the same with any number of
    processes: rank r of W predicts items r, r + W, ... (fnf.data), so two ranks never write the same name."""

    KINDS = ("tuned", "base")
    INDEX = "prompts.tsv"
    COLUMNS = ("file", "seed", "prompt")

    def __init__(self, output_dir: str = "predictions") -> None:
        """Write predicted images as PNG files.

        Args:
            output_dir: folder for tuned/, base/ and prompts.tsv.
        """
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.rows: list[tuple] = []  # this rank's (file, seed, prompt), in its items' order

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A new folder, or an earlier prediction's emptied first: its images never mix with this run's."""
        on_every_rank(trainer, self._prepare_folder)  # its broadcast: no rank writes before rank 0 has prepared
        for kind in self.KINDS:  # node-local disks: each rank makes the folders it writes into
            (self.output_dir / kind).mkdir(parents=True, exist_ok=True)
        self.rows = []

    @classmethod
    def check_folder(cls, out: Path) -> None:
        """``out`` is new, empty or an earlier prediction's (fnf predict checks it before the model loads too)."""
        check_output_folder(out, "predict_writer.output_dir", "fnf predict", cls.INDEX, names={*cls.KINDS, cls.INDEX})

    def _prepare_folder(self) -> None:
        out = self.output_dir
        self.check_folder(out)
        for kind in self.KINDS:
            if (out / kind).is_file():
                (out / kind).unlink()
            shutil.rmtree(out / kind, ignore_errors=True)
            (out / kind).mkdir(parents=True)
        write_text_atomically(out / self.INDEX, _tsv([self.COLUMNS]))  # marks the folder as fnf predict's

    @override
    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        for i, (prompt, seed) in enumerate(zip(prediction["prompt"], prediction["seed"])):
            item = len(self.rows) * trainer.world_size + trainer.global_rank
            name = f"{item:05d}_{seed}.png"
            for kind in self.KINDS:
                with atomic_path(self.output_dir / kind / name) as staging:
                    save_image(prediction[kind][i], staging, format="PNG")
            self.rows.append((name, int(seed), prompt))

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The index, once every image is written: every rank's rows on rank 0, in the prompt file's order."""
        rows = gathered(trainer, self.rows)
        if trainer.is_global_zero:
            write_text_atomically(self.output_dir / self.INDEX, _tsv([self.COLUMNS, *rows]))


def _tsv(rows: list[tuple]) -> str:
    """Tab-separated, a prompt with a tab, quote or line break quoted (csv's rules)."""
    text = io.StringIO()
    csv.writer(text, delimiter="\t", lineterminator="\n").writerows(rows)
    return text.getvalue()
