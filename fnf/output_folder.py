"""Folders fnf writes for people and tools to open (LoRA exports, reports, mask previews, predictions): written whole
or not at all, and an existing folder is replaced only when fnf wrote it (its marker file is there), never a folder
of the user's own."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Collection
from contextlib import contextmanager
from pathlib import Path

from fnf.files import check_writable, disk_full, fsync, umask_mode


def check_output_folder(out: Path, key: str, writer: str, marker: str, names: Collection[str] | None = None) -> None:
    """Before any work: ``out`` (the setting ``key``) must be a new or empty folder, or one ``writer`` wrote earlier
    (``marker`` inside and, when ``names`` is given, nothing but ``names``: what fnf writes there), and writable."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{key}: {out} is a file; expected a folder to write into")
    found = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    other = [name for name in found if names is not None and name not in names]
    if found and (other or not (out / marker).is_file()):
        holds = f"holds {', '.join(other[:3])}{' ...' if other[3:] else ''} and" if other else "exists and"
        raise ValueError(f"{key}: {out} {holds} was not written by {writer} (no {marker}); choose a new folder or "
                         "remove it")
    check_writable(out, key)


@contextmanager
def atomic_folder(directory: str | os.PathLike, probe: str):
    """Yield a staging folder beside ``directory``; on success it replaces ``directory`` whole, so readers see the
    old folder or the new one, never half of one. A failed write on a full file system becomes ENOSPC naming
    ``directory / probe`` (torch and safetensors lose the errno); the staging folder never stays behind."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    retired = staging.with_suffix(".old.tmp")  # staging names end in .tmp: fnf.files.remove_staging_files
    try:
        yield staging
        for written in [staging, *staging.rglob("*")]:  # mkdtemp's 0700, safetensors' 0600: not for a team
            os.chmod(written, umask_mode(0o777 if written.is_dir() else 0o666))
            fsync(written)  # on the disk before the rename publishes it (a power cut never shows empty files)
        if not (directory.exists() and exchange(staging, directory)):  # staging now holds the old folder
            if directory.exists():
                os.replace(directory, retired)  # a folder holding files cannot be replaced: move it aside first
            os.replace(staging, directory)
    except Exception as error:
        full = disk_full(directory / probe)
        if full is None:
            raise
        raise full from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``): no moment in which neither exists.
    False where the C library or the file system cannot (then two renames, with a moment without ``b``)."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_cwd, rename_exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE from <fcntl.h>, <stdio.h>
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # not supported here
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def write_text_folder(out: Path, files: dict[str, str]) -> None:
    """``out`` replaced whole by a folder of these text files (name -> content)."""
    with atomic_folder(out, next(iter(files))) as staging:
        for name, text in files.items():
            (staging / name).write_text(text, encoding="utf-8")
