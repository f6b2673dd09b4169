"""Checkpoints are complete or absent: a kill or a full disk mid-write leaves the previous file intact.

Lightning's default writer stages the bytes in the system temp folder and moves them over the target,
which is a copy (not a rename) when that folder is on another file system. Here the bytes go to a
temporary file beside the target, are flushed to disk, and replace it with one ``os.replace``.
Loading uses ``weights_only=True``: fnf checkpoints hold tensors and plain types only.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _load as pl_load
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override


def umask_mode(mode: int) -> int:
    """``mode`` under the process umask: what ``open`` / ``mkdir`` would give (0o644 / 0o755 under 022).
    ``tempfile`` creates its files 0600 and folders 0700, which a team sharing a run folder cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (the folder a write there would land in)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


FULL_DISK_BYTES = 1 << 20  # a failed write with less free space than this is reported as a full disk


def disk_full(path: str | os.PathLike) -> OSError | None:
    """The error to raise when a write to ``path`` failed because its file system is full, else None.

    torch.save and safetensors lose the errno (torch: "unexpected pos 704 vs 598"), so it is read back from
    the file system itself: call this while the partial file still holds the space it took."""
    try:
        free = shutil.disk_usage(nearest_existing(Path(path).parent)).free
    except OSError:
        return None
    return None if free >= FULL_DISK_BYTES else OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def check_writable(folder: str | os.PathLike, key: str) -> None:
    """Fail before training, not after it, when ``folder`` (named by config ``key``) cannot be created or written:
    a trial folder is made and removed in its nearest existing ancestor (permission bits do not stop root)."""
    ancestor = nearest_existing(Path(folder))
    try:
        if not ancestor.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "a file, not a folder", str(ancestor))
        os.rmdir(tempfile.mkdtemp(prefix=".fnf-write-check.", dir=ancestor))
    except OSError as error:
        raise OSError(f"{key}: cannot write to {folder} ({error.strerror} in {ancestor})") from None


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path in ``path``'s folder; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(staging)
        with open(staging, "rb+") as written:
            os.fsync(written.fileno())
        os.chmod(staging, umask_mode(0o666))
        os.replace(staging, path)
    except Exception as error:
        full = disk_full(path)
        if full is None:
            raise
        raise full from error
    finally:
        if os.path.exists(staging):
            os.remove(staging)


class AtomicCheckpointIO(TorchCheckpointIO):
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        with atomic_path(path) as staging:
            torch.save(checkpoint, staging)

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
