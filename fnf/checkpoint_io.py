"""Checkpoints are complete or absent: a kill or a full disk mid-write leaves the previous file intact.

Lightning's default writer stages the bytes in the system temp folder and moves them over the target,
which is a copy (not a rename) when that folder is on another file system. Here the bytes go to a
temporary file beside the target, are flushed to disk, and replace it with one ``os.replace``.
Loading uses ``weights_only=True``: fnf checkpoints hold tensors and plain types only.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _load as pl_load
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override


def umask_mode(mode: int) -> int:
    """``mode`` under the process umask: what ``open`` / ``mkdir`` would give (0o644 / 0o755 under 022).
    ``tempfile`` creates its files 0600 and folders 0700, which a team sharing a run folder cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


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
        if not Path(path).is_file():
            raise FileNotFoundError(f"ckpt_path: checkpoint {path} not found")
        try:
            return pl_load(path, map_location=map_location, weights_only=True)
        except Exception as error:  # truncated / corrupt / pickled objects beyond tensors and plain types
            raise ValueError(f"ckpt_path: cannot load {path} as an fnf checkpoint "
                             f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
