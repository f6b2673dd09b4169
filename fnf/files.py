"""Files that are complete or absent, and folders checked before they are needed: the helpers every writer of
fnf shares (checkpoints, LoRA exports, reports, scans). Plain Python, so tools that write files but train nothing
(``fnf report``) start without loading torch or Lightning."""

from __future__ import annotations

import errno
import os
import resource
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


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


def disk_full(path: str | os.PathLike, written: str | os.PathLike | None = None) -> OSError | None:
    """The error to raise when a write to ``path`` failed because its file system is full or the partial file
    ``written`` reached the process's file-size limit (``ulimit -f``), else None.

    torch.save and safetensors lose the errno (torch: "unexpected pos 704 vs 598"), so it is read back from
    the file system itself: call this while the partial file still holds the space it took."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if written is not None and limit != resource.RLIM_INFINITY and os.path.getsize(written) >= limit:
        return OSError(errno.EFBIG, os.strerror(errno.EFBIG), str(path))
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


def fsync(path: str | os.PathLike) -> None:
    """``path``'s data (a file) or entries (a folder) on the disk, not only in the page cache."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path in ``path``'s folder; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(staging)
        fsync(staging)
        os.chmod(staging, umask_mode(0o666))
        os.replace(staging, path)
    except Exception as error:
        full = disk_full(path, staging if os.path.exists(staging) else None)
        if full is None:
            raise
        raise full from error
    finally:
        if os.path.exists(staging):
            os.remove(staging)


def remove_staging_files(folder: str | os.PathLike, name: str = "*") -> None:
    """The staging files and folders (``atomic_path``'s and ``atomic_folder``'s ``.<name>.*.tmp``) of ``name`` a
    process killed mid-write left in ``folder``, each as large as what it was writing: only while this process
    holds the run's lock (no one else writes them)."""
    for staging in Path(folder).glob(f".{name}.*.tmp"):
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
        else:
            staging.unlink(missing_ok=True)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """``path`` holds ``text`` whole, or keeps what it held: a crash or a full disk never leaves half a file."""
    with atomic_path(path) as staging:
        staging.write_text(text, encoding="utf-8")
