"""``fnf scan --config C --out scan.jsonl [--batch_size N]``: where does the base model fail?

Most prompts give a clean base image; a training step on them costs as much as any other and fixes nothing. The
scan samples the base image I0 (LoRA off, the item's x_T) for every (prompt, seed) item of ``data.train_file``,
runs every reward head and the config's mask pipeline on it, and appends one row per item to ``--out`` (format:
fnf/scan_file.py); ``data.filter`` then trains on the items that failed. The config is parsed exactly as by
``fnf fit``, so every model / data / trainer key applies (``--trainer.devices 2 --trainer.strategy ddp`` scans
in parallel: a Lightning predict run whose processes append to the same file under a lock). A scan that stopped
resumes: items that have a row are skipped, and a torn last line is cut off and redone.
"""

from __future__ import annotations

import signal
import sys
from argparse import ArgumentError
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader
from typing_extensions import override

from fnf.files import check_writable
from fnf.cli import FnfCLI
from fnf.data import PromptDataModule, collate
from fnf.errors import check_config_files, parser_error
from fnf.module import FocusNFix
from fnf.plugins import load_plugins
from fnf.recipe import json_types
from fnf.sampling import initial_noise
from fnf.scan_file import append_rows, read_rows, row_key, scan_settings, settings_difference


class PromptScanner(FocusNFix):
    """FocusNFix whose predict step scans: base image I0 -> each head's base score and mask area, one row per item."""

    head_args: list[dict] | None = None  # each head's class_path and init_args, from the config (fnf.scan.main)

    @override
    def on_predict_start(self) -> None:
        """Mask areas say where I0 is wrong: the empty-mask policy (what training does with an empty mask) does not
        apply, or ``global`` would give a clean image a mask covering the whole image."""
        self.mask_args = replace(self.mask_args, empty="keep")

    @override
    def predict_step(self, batch: dict, batch_idx: int) -> list[dict[str, Any]]:
        prompts, seeds = batch["prompt"], batch["seed"]
        text, uncond = self._encode(prompts)
        noise = initial_noise(seeds, self.latent_shape, self.device)  # the x_T training uses for this item
        with torch.no_grad(), self.model.adapter_disabled():
            base = self.sampler(noise, text, uncond, "none")  # I0
        masks, _, scores = self._localise(base.images, prompts)  # (B, heads, H, W), _, (B, heads)
        names = self.head_names
        bad = (~torch.isfinite(scores)).nonzero()  # (n, 2): (item, head) pairs
        if len(bad):
            item, head = bad[0].tolist()
            raise FloatingPointError(f"non-finite reward {names[head]} on the base image of {prompts[item]!r}, "
                                     f"seed {seeds[item]}")
        masked = [j for j, term in enumerate(self.terms) if term.mask != "none"]
        areas = masks.float().mean(dim=(2, 3)).cpu()  # (B, heads): fraction of the pixels
        union = masks[:, masked].float().amax(1).mean(dim=(1, 2)).cpu() if masked else None  # (B,)
        scores, settings = scores.float().cpu(), scan_settings(self, self.head_args)
        return [{"prompt": prompt, "seed": int(seed),
                 "scores": {name: scores[i, j].item() for j, name in enumerate(names)},
                 "mask_area": {name: areas[i, j].item() if j in masked else None for j, name in enumerate(names)},
                 "union_mask_area": None if union is None else union[i].item(), "settings": settings}
                for i, (prompt, seed) in enumerate(zip(prompts, seeds))]


class PendingItems(L.LightningDataModule):
    """The items of ``data.train_file`` (with its seeds and copies) that have no row in the scan file yet."""

    def __init__(self, data: PromptDataModule, out: Path, heads: list[str], settings: dict[str, Any],
                 batch_size: int) -> None:
        super().__init__()
        self.data, self.out, self.heads, self.settings, self.batch_size = data, out, heads, settings, batch_size
        self.items: list[dict] = []
        self.done = 0

    @override
    def setup(self, stage: str) -> None:
        """Every process reads the file between Lightning's setup barriers: nobody appends before all have read it,
        so all see the same pending list (the distributed sampler splits it by index). ``main`` reads it once before
        too, to run no trainer when nothing is pending; processes Lightning launches read it while the first waits
        for them to join, before any row of this scan is appended."""
        items = self.data.load_file("train_file")
        rows = read_rows(self.out, repair=True)
        for row in rows:
            if list(row["scores"]) != self.heads:
                raise ValueError(f"--out {self.out}: its rows score the heads {', '.join(row['scores'])}, this "
                                 f"config's are {', '.join(self.heads)}; scan into another file")
            difference = settings_difference(row["settings"], self.settings)
            if difference:
                key, theirs, ours = difference
                raise ValueError(f"--out {self.out}: its rows were scanned with {key}={theirs}, this config has "
                                 f"{ours}; scan into another file")
        done = {row_key(row) for row in rows}
        pending = {row_key(item): item for item in items if row_key(item) not in done}  # duplicates scanned once
        self.items, self.done = list(pending.values()), len({row_key(item) for item in items} & done)

    @override
    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.items, batch_size=self.batch_size, num_workers=self.data.num_workers,
                          collate_fn=collate)


class RowWriter(BasePredictionWriter):
    """Appends each batch's rows as soon as they exist: a stopped scan loses at most the batches in flight."""

    def __init__(self, out: Path) -> None:
        super().__init__(write_interval="batch")
        self.out = out

    @override
    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        append_rows(self.out, prediction)


class ScanCLI(FnfCLI):
    """``fnf fit``'s parser (every model / data / trainer key) plus the scan's own ``--out`` and ``--batch_size``."""

    @override
    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--out", type=str | None, default=None,
                            help="Scan file (JSON lines) to append to, required; rows already there are not scanned "
                                 "again.")
        parser.add_argument("--batch_size", type=int | None, default=None,
                            help="Items per batch and process (no gradients: larger than training's fits); "
                                 "null: data.batch_size.")

    @override
    def parse_arguments(self, parser, args) -> None:
        """One parser, no subcommands (and no LightningCLI warning that sys.argv holds more: ``scan``)."""
        try:
            self.config = parser.parse_args(args)
        except ArgumentError as error:
            raise ValueError(parser_error(error, list(parser.get_defaults().keys()), args)) from None

    @override
    def before_instantiate_classes(self) -> None:
        """The scan's own options, checked before the model loads."""
        super().before_instantiate_classes()
        if not self.config.out:
            raise ValueError("--out: the scan file to write is required (JSON lines, appended to)")
        if Path(self.config.out).is_dir():
            raise ValueError(f"--out {self.config.out}: a folder; expected the scan file (JSON lines, appended to)")
        check_writable(Path(self.config.out).parent, "--out")
        if not self.config.data.train_file:
            raise ValueError("data.train_file: the prompt file to scan is required")
        if self.config.batch_size is not None and self.config.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.config.batch_size}")

    @override
    def _instantiate_trainer(self, config: dict, callbacks: list):
        """The scan writes rows, not PNGs: ``fnf predict``'s image writer stays out."""
        callbacks = [c for c in callbacks if not isinstance(c, BasePredictionWriter)]
        return super()._instantiate_trainer(config, [*callbacks, RowWriter(Path(self.config.out))])


def summary(rows: list[dict], heads: list[str]) -> str:
    """Per head: mean base score and the share of items whose base mask is not empty."""
    parts = []
    for head in heads:
        mean = sum(row["scores"][head] for row in rows) / len(rows)
        areas = [row["mask_area"][head] for row in rows if row["mask_area"][head] is not None]
        flagged = f", mask not empty on {sum(a > 0 for a in areas) / len(areas):.1%}" if areas else ""
        parts.append(f"{head}: mean base score {mean:.4g}{flagged}")
    return "; ".join(parts)


def main(args: list[str]) -> None:
    load_plugins()
    check_config_files(args)
    cli = ScanCLI(PromptScanner, PromptDataModule, args=args, run=False, save_config_callback=None,
                  auto_configure_optimizers=False,  # nothing is optimised
                  parser_kwargs={"exit_on_error": False, "parser_mode": "omegaconf", "prog": "fnf scan",
                                 "description": __doc__.splitlines()[0]},
                  trainer_defaults={"logger": False, "enable_checkpointing": False})
    data, out = cli.datamodule, Path(cli.config.out)
    heads = cli.model.head_names
    out.parent.mkdir(parents=True, exist_ok=True)
    rewards = json_types(cli.config.model.as_dict()["rewards"])
    cli.model.head_args = [term["head"] for term in rewards]  # scores depend on them too (weights, thresholds)
    settings = scan_settings(cli.model, cli.model.head_args)
    pending = PendingItems(data, out, heads, settings, cli.config.batch_size or data.batch_size)
    pending.setup("predict")  # every item has a row already: no trainer run (and no processes launched) for none
    if pending.items:
        try:
            cli.trainer.predict(cli.model, datamodule=pending, return_predictions=False)
        except SystemExit as stopped:  # Lightning ends a run stopped for a Ctrl-C with 1; a shell, and fnf fit, say 130
            if stopped.code == 1 and cli.trainer.interrupted:
                sys.exit(128 + signal.SIGINT)
            raise
        cli.trainer.strategy.barrier("scan_done")  # every process's last rows are in the file
    if cli.trainer.is_global_zero:
        scanned = {row_key(item) for item in data.load_file("train_file")}
        rows = [row for row in read_rows(out) if row_key(row) in scanned]
        print(f"fnf scan: {out}: {len(rows)} items of {data.train_file} ({pending.done} scanned before); "
              + summary(rows, heads))
