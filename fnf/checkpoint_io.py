"""Checkpoints are complete or absent: a kill or a full disk mid-write leaves the previous file intact.

Lightning's default writer stages the bytes in the system temp folder and moves them over the target,
which is a copy (not a rename) when that folder is on another file system. Here the bytes go to a
temporary file beside the target, are flushed to disk, and replace it with one ``os.replace``.
Loading uses ``weights_only=True``: fnf checkpoints hold tensors and plain types only.
"""

from __future__ import annotations

import pickle
import resource
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _load as pl_load
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from fnf.errors import HINT
from fnf.files import atomic_path, nearest_existing


class AtomicCheckpointIO(TorchCheckpointIO):
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        try:
            with atomic_path(path) as staging:
                torch.save(checkpoint, staging)
        except OSError as error:  # a full disk, a quota: what to do, on the same line
            error.add_note(HINT + "checkpoints saved before stay as they were: make room, then --ckpt_path last "
                           "resumes from the newest")
            raise

    @override
    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        if Path(path).is_dir():
            raise IsADirectoryError(f"ckpt_path: {path} is a folder; expected a .ckpt file")
        if not Path(path).is_file():
            raise FileNotFoundError(f"ckpt_path: checkpoint {path} not found")
        try:
            checkpoint = pl_load(path, map_location=map_location, weights_only=True)
        except Exception as error:
            if isinstance(error, pickle.UnpicklingError) and zipfile.is_zipfile(path):  # a torch file, refused
                raise ValueError(f"ckpt_path: {path} holds objects other than tensors and plain types, so it is not "
                                 "an fnf checkpoint (fnf loads checkpoints with weights_only=True)") from None
            raise ValueError(f"ckpt_path: cannot read {path} as a checkpoint: truncated or not a torch checkpoint "
                             f"({type(error).__name__})") from None
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise ValueError(f"ckpt_path: {path} is a torch file but not a Lightning checkpoint (no state_dict)")
        return checkpoint


def check_room_for_checkpoints(folder: str, lora: list[torch.nn.Parameter], key: str) -> None:
    """Fail before the first step, not at the first save after it, when ``folder``'s file system lacks room for two
    checkpoints (a save writes the new one beside the previous). A checkpoint is about the LoRA weights and two
    optimizer moments per weight (AdamW), in float32."""
    size = 3 * 4 * sum(p.numel() for p in lora)
    free = shutil.disk_usage(nearest_existing(Path(folder))).free
    if free < 2 * size:
        raise OSError(f"{key}: {folder} has {free / 2**20:.1f} MiB free; a checkpoint of this run takes about "
                      f"{size / 2**20:.1f} MiB and a save needs room for two: make room or choose another folder")
    largest = resource.getrlimit(resource.RLIMIT_FSIZE)[0]  # ulimit -f: a larger write fails with EFBIG
    if largest != resource.RLIM_INFINITY and largest < size:
        raise OSError(f"{key}: this process may write files of at most {largest / 2**20:.1f} MiB (ulimit -f); a "
                      f"checkpoint of this run takes about {size / 2**20:.1f} MiB: raise the limit")


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is also the run's final step: Lightning keeps the last periodic one
    when max_steps is not a multiple of every_n_train_steps, so ``fnf test --ckpt_path last`` would evaluate
    another LoRA than the run exported, and ``--ckpt_path auto`` would retrain the steps after it."""

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """The final step's last.ckpt is saved here, where the loop is still inside its epoch: saved in
        ``on_train_end`` it would hold an epoch the loop has already ended, and a run extended from it (``--ckpt_path
        last`` with a larger max_steps) would start a new epoch's order instead of finishing this one."""
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        final = trainer.global_step == trainer.max_steps and not trainer.fast_dev_run
        if final and self.save_last is True and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @override
    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.fast_dev_run:  # a dry run leaves nothing to resume from (Lightning's on_train_end would save)
            return
        if self.save_last is True and not self._should_skip_saving_checkpoint(trainer):  # "link": Lightning's way
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        else:
            super().on_train_end(trainer, pl_module)
