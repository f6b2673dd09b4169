"""Which folders a fit writes into: every new run claims a version folder of its own (even when runs start together
in one root), locks the folder of its checkpoints against a second fit, never writes into an earlier run's files,
and leaves nothing behind when it fails before training. Resuming a run into its folder: fnf.resume."""

from __future__ import annotations

import contextlib
import fcntl
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import lightning as L
from lightning import Callback
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from typing_extensions import override

from fnf.callbacks import LoraExporter, on_every_rank
from fnf.evaluation import Evaluation
from fnf.files import check_writable


def lock_run_folder(run: Path, key: str = "trainer.default_root_dir", name: str = ".fnf.lock") -> IO:
    """One process at a time trains in a run folder: two ``--ckpt_path last`` of one job (a requeued job racing
    its predecessor) would both write its checkpoints, logs and export. An ``flock`` on ``run/.fnf.lock``, held
    until the returned file is closed or the process ends, however it ends (kill -9 leaves no stale lock; on
    NFS, flock may lock per node only). ``key``: the setting that put the folder there, for a folder that cannot be
    written; ``name``: the lock file's (``AUTO_LOCK``: the root's, held by a ``--ckpt_path auto`` starting over)."""
    check_writable(run, key)
    run.mkdir(parents=True, exist_ok=True)
    file = open(run / name, "a")  # noqa: SIM115 (the caller closes it when the run ends)
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.close()
        raise ValueError(f"{run}: another fnf fit is training here (it holds {run / name}); wait for it to "
                         "end, or stop it first") from None
    return file


AUTO_LOCK = ".fnf.auto.lock"
"""Held in ``trainer.default_root_dir`` by a ``--ckpt_path auto`` that found no checkpoint and starts a new run: a
second one (a requeued job racing its predecessor before its first checkpoint) would start a second run, and every
later ``auto`` would then refuse the root's two unfinished runs."""


def folder_to_lock(checkpoints: Path) -> Path:
    """The folder whose lock guards the run writing into ``checkpoints``: its run folder for fnf's layout
    (``<run>/checkpoints``), else ``checkpoint.dirpath`` itself (runs of a sweep may put theirs side by side)."""
    return checkpoints.parent if checkpoints.name == "checkpoints" else checkpoints


def checkpoints_parent(trainer: L.Trainer, claimed: Path | None) -> Path:
    """The folder a new run locks (``folder_to_lock`` of its checkpoints folder): the one a later ``--ckpt_path
    last`` locks (``folder_to_lock`` of its checkpoint's folder), whatever the logger and checkpoint settings."""
    callback = trainer.checkpoint_callback
    if callback is not None and callback.dirpath:
        return folder_to_lock(Path(callback.dirpath))
    if claimed is not None:
        return claimed
    logger = trainer.loggers[0] if trainer.loggers else None  # a version the user chose, or no logger at all
    return Path(getattr(logger, "log_dir", None) or trainer.default_root_dir)


def check_fresh_run_folder(trainer: L.Trainer, claimed: Path | None, chosen_dirpath: str | None) -> None:
    """A new fit writes into no other run's files: its checkpoints would replace that run's last.ckpt (lost to
    ``--ckpt_path last``) and its rows would join that run's metrics.csv. The run folder's lock keeps out a run
    training now; this, one that trained there before: a shared ``checkpoint.dirpath``, a logger version chosen by
    name, ``logger: false`` runs in one root. ``claimed``: the version folder this run created (empty)."""
    saver = trainer.checkpoint_callback
    if saver is not None:  # where Lightning will put them if no one has said so yet
        checkpoints = Path(saver.dirpath or checkpoints_parent(trainer, claimed) / "checkpoints").absolute()
        found = sorted(checkpoints.glob("*.ckpt"))
        key = ("checkpoint.dirpath" if chosen_dirpath else "trainer.logger's version" if trainer.loggers
               else "trainer.default_root_dir")
        if found:
            raise ValueError(f"{key}: {checkpoints} holds another run's checkpoints ({found[0].name}); continue that "
                             "run with --ckpt_path last, or start this one in a folder of its own")
    log_dirs = [getattr(logger, "log_dir", None) for logger in trainer.loggers] if claimed is None else []
    for log_dir in (Path(d).absolute() for d in log_dirs if d):  # a version folder this run did not create
        if (log_dir / "metrics.csv").exists() or any(log_dir.glob("events.out.tfevents.*")):
            raise ValueError(f"trainer.logger's version: {log_dir} holds another run's logs; continue that run with "
                             "--ckpt_path last, or choose another version")


class RunFolderGuard(Callback):
    """Rank 0's run folder, settled with every rank in setup, once the process group exists: an error rank 0 met
    preparing it before (``problem``: claiming a version folder, another fit holding its lock) stops every rank
    there. Ranks started on their own (torchrun, srun) would otherwise wait for a stopped rank 0 until the process
    group's timeout. Holds the run folder's lock (``files``, from ``lock_run_folder``) to the end of the process, or
    ``release``."""

    def __init__(self, problem: Exception | None, files: list[IO]) -> None:
        self.problem, self.files = problem, files

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        on_every_rank(trainer, self._settle)

    def _settle(self) -> None:
        if self.problem is not None:
            raise self.problem

    def release(self) -> None:
        for file in self.files:
            file.close()
        self.files = []


def keeps_run_folders(trainer: L.Trainer) -> bool:
    """The first logger gives each run a version folder under its save dir (TensorBoard, CSV), or there is none; the
    others (MLflow, W&B, ...) would put every run's checkpoints and LoRA export into one folder of their own
    (Lightning's ``trainer.log_dir`` rule), outside ``default_root_dir`` where ``--ckpt_path last`` looks."""
    return not trainer.loggers or isinstance(trainer.loggers[0], (TensorBoardLogger, CSVLogger))


def claim_folder_in_root(trainer: L.Trainer) -> Path | None:
    """For a first logger without version folders: rank 0 claims ``<default_root_dir>/lightning_logs/version_N`` for
    the run's checkpoints and LoRA export, as ``claim_version_folder`` claims a logger's."""
    if trainer.global_rank != 0:
        return None
    root = Path(trainer.default_root_dir) / "lightning_logs"
    check_writable(root.parent, "trainer.default_root_dir")
    taken = [int(p.name[8:]) for p in root.glob("version_*") if p.name[8:].isdigit()] if root.is_dir() else []
    return root / f"version_{_make_next_version(root, max(taken, default=-1) + 1)}"


def _make_next_version(root: Path, version: int) -> int:
    """The first ``version_N`` from ``version`` on that this process creates (an exclusive mkdir: two runs listing
    the same free number cannot both take it). The root is created too: see remove_if_unstarted."""
    while True:
        try:
            (root / f"version_{version}").mkdir(parents=True)
            return version
        except FileExistsError:
            version += 1


def use_run_folder(trainer: L.Trainer, run: Path) -> None:
    """Checkpoints in ``run/checkpoints``, the LoRA export in ``run/lora``, the evaluation's metrics files and
    ``test_samples/`` and the run's ``config.yaml`` in ``run``, unless the config chose folders."""
    callback = trainer.checkpoint_callback
    if callback is not None and callback.dirpath is None:
        callback.dirpath = str(run / "checkpoints")
    for callback in trainer.callbacks:
        if isinstance(callback, LoraExporter):
            callback.run_folder = run  # what the run's last line names (the first logger's log dir is another)
            callback.dirpath = callback.dirpath or str(run / "lora")
        if isinstance(callback, Evaluation) and callback.output_dir is None:
            callback.output_dir = str(run)
        if isinstance(callback, SaveConfigCallback):  # it joins log_dir and this: an absolute path wins the join
            callback.config_filename = str((run / callback.config_filename).absolute())


def claim_version_folder(trainer: L.Trainer) -> Path | None:
    """Give this run a version folder no concurrent run in the same root also takes (sweeps, job arrays).

    TensorBoard / CSV loggers pick ``max(version_N) + 1`` from a listing, so two runs started together get the
    same folder. Here rank 0 claims ``version_N`` with an exclusive mkdir, stepping N on collision; other ranks
    write no logs, and checkpoints follow rank 0's folder (Lightning broadcasts it). Returns the claimed folder."""
    claimed, versions = None, {}  # loggers sharing a root (TensorBoard + CSV in one save_dir) share the version
    if trainer.global_rank != 0:
        return claimed
    for logger in trainer.loggers:
        if not hasattr(logger, "_version") or logger._version is not None:  # no versions, or the user chose one
            continue
        root = Path(logger.root_dir)
        if root not in versions:
            check_writable(root, "trainer.default_root_dir (or the logger's save_dir)")
            versions[root] = _make_next_version(root, logger.version)  # from Lightning's guess from the listing
        logger._version = versions[root]
        claimed = claimed or root / f"version_{versions[root]}"
    return claimed


def remove_if_unstarted(folder: Path | None, created: Sequence[Path] = ()) -> None:
    """A run that failed before training (a config error) leaves no stub version folder (config, empty event files),
    nor an empty ``lightning_logs`` it created (a run claiming a folder meanwhile recreates it: ``parents=True``),
    nor the empty ``default_root_dir`` and parents it ``created`` (deepest first); a folder holding a checkpoint is
    always kept."""
    if folder is not None and folder.is_dir() and not any(folder.rglob("*.ckpt")):
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):  # not empty: other runs' folders
            folder.parent.rmdir()
    for parent in created:
        with contextlib.suppress(OSError):  # a root this run created holds no other run's lock
            (parent / AUTO_LOCK).unlink()
        try:
            parent.rmdir()
        except FileNotFoundError:  # never made (the run failed before writing anything)
            continue
        except OSError:  # not empty
            break
