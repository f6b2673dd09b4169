"""Exact resume: a run killed mid-epoch and restored from its last checkpoint trains on the same batches,
in the same order, with the same random numbers, as a run that never stopped.

Lightning restores weights, optimizer, schedulers and loop counters; this module adds what it leaves
to the user: a shuffle order that depends only on (seed, epoch), skipping the batches of the current
epoch that were already trained on, and the global RNG states (DRaFT-LV noise, LoRA dropout). Around it:
what a checkpoint holds (LoRA and RNG states only), ``--ckpt_path last`` (the newest last.ckpt, continuing
its run folder) and a version folder of its own for every new run.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import lightning as L
import torch
from lightning import Callback
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, DistributedSampler
from typing_extensions import override

from fnf.callbacks import LoraExporter, check_lora_folder, on_every_rank
from fnf.checkpoint_io import AtomicCheckpointIO
from fnf.evaluation import Evaluation
from fnf.export import WEIGHT_NAME, save_lora
from fnf.files import check_writable


class EpochShuffle(DistributedSampler):
    """One permutation per (seed, epoch), split across ``num_replicas`` ranks as rank, rank + R, ...

    The order never depends on how the run got to an epoch (resume) nor on the number of processes: with
    per-rank batch size b, the ranks' batches s together hold items [s·R·b, (s+1)·R·b) of the permutation,
    the global batch a single process with batch size R·b sees (so DDP and one process train alike).
    Being a ``DistributedSampler``, Lightning uses it as is under DDP and calls ``set_epoch`` on it.
    """

    def __init__(self, size: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=False, seed=seed)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + 7_919 * self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        order += order[: self.total_size - len(order)]  # pad as DistributedSampler does: equal shards
        return iter(order[self.rank:self.total_size:self.num_replicas])


class ResumableLoader(DataLoader):
    """A DataLoader whose next epoch starts after ``skip_batches`` batches (the ones a restored run already did).

    The skip is lazy (``islice``), so the sampler is only iterated once Lightning has set its epoch; it is
    per process, so under DDP each rank skips its own shard's batches.
    """

    def __init__(self, *args, skip_batches: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.skip_batches = skip_batches

    def __iter__(self):
        skip, self.skip_batches = self.skip_batches, 0
        return itertools.islice(super().__iter__(), skip, None)


def batches_done_in_epoch(trainer) -> int:
    """Optimizer-step batches finished in the current epoch (what a checkpoint saved now has trained on)."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed if trainer is not None else 0


def rng_states() -> dict:
    """This process's global RNG states as tensors (loadable with ``torch.load(weights_only=True)``): the CPU
    generator's and its CUDA device's (DRaFT-LV noise is drawn on the device)."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        if states["cuda"].dim() == 2:  # older checkpoints: every device as the saving process saw them
            torch.cuda.set_rng_state_all(list(states["cuda"]))
        else:
            torch.cuda.set_rng_state(states["cuda"])


def every_rank(value) -> list:
    """``value`` of every process, in rank order (a collective: every rank calls it)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def check_lora_state(own: dict[str, torch.Size], saved: dict[str, torch.Tensor]) -> None:
    """Refuse a checkpoint whose LoRA weights do not fit the model's (names from target_modules, shapes from rank)."""
    missing, unexpected = sorted(own.keys() - saved.keys()), sorted(saved.keys() - own.keys())
    if not any("lora_" in name for name in saved):
        raise ValueError("ckpt_path: the checkpoint holds no LoRA weights: not a checkpoint written by fnf fit")
    if missing or unexpected:
        raise ValueError(f"ckpt_path: the checkpoint's LoRA does not match model.lora (target_modules): "
                         f"{len(missing)} LoRA weights missing (e.g. {missing[:1]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:1]})")
    for name, value in saved.items():
        if value.shape != own[name]:
            rank_axis = 0 if "lora_A" in name else -1  # A: (rank, in ...), B: (out, rank ...)
            hint = ("set model.lora.rank to the checkpoint's rank" if value.shape[rank_axis] != own[name][rank_axis]
                    else "the layer's width differs: was the checkpoint trained on another base model than "
                         "model.pretrained?")
            raise ValueError(f"ckpt_path: LoRA shape {tuple(value.shape)} in the checkpoint but "
                             f"{tuple(own[name])} in the model for {name}; {hint}")


def find_last(root: str | Path, required: bool, max_steps: int | None = None, dirpath: str | None = None) -> str | None:
    """The newest ``last*.ckpt`` under ``root`` (``trainer.default_root_dir``) or in ``dirpath``
    (``checkpoint.dirpath``, where the config puts checkpoints elsewhere); None when there is none and the caller may
    start a new run instead (``--ckpt_path auto``). ``max_steps`` (a resumed fit): the one run short of it, if any;
    two such runs are refused, or jobs of an array sharing a root would continue each other's runs."""
    where = f"{root} (trainer.default_root_dir)" + (f" or {dirpath} (checkpoint.dirpath)" if dirpath else "")
    found = {path.resolve() for path in Path(root).rglob("last*.ckpt")}
    found |= {path.resolve() for path in Path(dirpath).glob("last*.ckpt")} if dirpath else set()
    found = sorted(found, key=lambda path: path.stat().st_mtime)
    newest = {path.parent.parent: path for path in found}  # <run>/checkpoints/last.ckpt, per run
    unfinished = sorted(str(run) for run, path in newest.items()
                        if max_steps is not None and _short_of(path, max_steps))
    if len(unfinished) > 1:
        raise ValueError(f"--ckpt_path last / auto: {where} holds {len(unfinished)} "
                         f"unfinished runs ({', '.join(unfinished[:3])}{', ...' if unfinished[3:] else ''}); a resume "
                         "must not pick another run's: give each run (each job of an array) a default_root_dir of its "
                         "own")
    if unfinished:
        return str(newest[Path(unfinished[0])])
    if found:
        return str(found[-1])
    if required:
        action = ("leave out --ckpt_path (or use --ckpt_path auto) to start a new run" if max_steps is not None
                  else "train first (fnf fit), or give a checkpoint's path")  # evaluation: nothing to start
        raise FileNotFoundError(f"--ckpt_path last: no last.ckpt under {where}; {action}")
    rank_zero_info(f"fnf: no last.ckpt under {where}; starting a new run")
    return None


def is_run_last(ckpt_path: str, root: str | None, dirpath: str | None = None) -> bool:
    """``ckpt_path`` is the ``last*.ckpt`` of a run folder under ``root`` (``trainer.default_root_dir``), or of the
    config's ``checkpoint.dirpath``: a fit from it continues that run, as ``--ckpt_path last`` would. Any other
    checkpoint (an earlier step, another root's run) is a starting point: its fit is a new run, and the run it came
    from stays as it was. (A distributed checkpoint is a folder.)"""
    path = Path(ckpt_path).resolve()
    if not (path.exists() and path.name.startswith("last")):
        return False
    return ((path.parent.name == "checkpoints" and Path(root or ".").resolve() in path.parents)
            or (dirpath is not None and path.parent == Path(dirpath).resolve()))


def _short_of(checkpoint: Path, max_steps: int) -> bool:
    """The checkpoint has fewer than ``max_steps`` steps (unbounded: -1), or cannot be read (a torn file)."""
    try:  # mmap: the step number, not the weights, is read
        step = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=True).get("global_step", 0)
    except Exception:  # noqa: BLE001 (what is wrong with it is said when it is loaded)
        return True
    return max_steps < 0 or step < max_steps


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


def continue_run_folder(trainer: L.Trainer, ckpt_path: str, log_dir: str | None = None) -> Path:
    """A TensorBoard / CSV logger of the same root continues the checkpoint's version folder, so its checkpoints,
    logs and LoRA export stay together; ``log_dir``: the run's, as its checkpoint recorded it, for checkpoints in a
    ``checkpoint.dirpath`` of their own. Returns the run folder."""
    checkpoints = Path(ckpt_path).resolve().parent
    run = checkpoints.parent  # <root>/lightning_logs/version_N/checkpoints/last.ckpt
    if checkpoints.name != "checkpoints" and log_dir is not None and Path(log_dir).is_dir():
        run = Path(log_dir).resolve()
    for logger in trainer.loggers:
        if hasattr(logger, "_version") and Path(logger.root_dir).resolve() == run.parent:
            logger._version = run.name  # a str version is the folder name itself
    rank_zero_info(f"fnf: resuming from {ckpt_path}")
    return run


def export_if_complete(trainer: L.Trainer, module: L.LightningModule, ckpt_path: str) -> None:
    """For a checkpoint already at ``max_steps`` (nothing is left to train): the run's LoRA export is written from the
    checkpoint if it is missing (a run killed between its last checkpoint and its export), where the run's
    ``lora_export.dirpath`` puts it (default: ``<log dir>/lora``)."""
    checkpoint = AtomicCheckpointIO().load_checkpoint(ckpt_path)  # one-line errors for missing / corrupt files
    saved = checkpoint.get("state_dict") or {}
    check_lora_state({name: p.shape for name, p in module.named_parameters() if p.requires_grad}, saved)
    exporter = next((c for c in trainer.callbacks if isinstance(c, LoraExporter)), None)
    lora = Path(ckpt_path).parent.parent / "lora"  # <log dir>/checkpoints/x.ckpt -> <log dir>/lora
    if exporter is not None and exporter.dirpath:
        lora = Path(exporter.dirpath)
        check_lora_folder(lora, {})  # new, empty or an earlier LoRA export: never a foreign folder
    if trainer.global_rank == 0 and not (lora / WEIGHT_NAME).is_file():
        module.load_state_dict(saved, strict=False)  # the LoRA; frozen weights are not in it
        save_lora(module.model, lora)
    rank_zero_info(f"fnf: {ckpt_path} is already at max_steps={trainer.max_steps}; nothing to train. LoRA: {lora}")


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


class LoraOnlyCheckpoints(L.LightningModule):
    """Checkpoints hold the trainable (LoRA) weights and the global RNG states, nothing frozen; loading refuses a
    LoRA that does not fit the model (Lightning loads non-strictly here, since the frozen weights are absent)."""

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        # DRaFT-LV noise and LoRA dropout continue exactly on resume, on every rank: rank 0 writes the checkpoint,
        # but each rank's CUDA generator (its own device) has drawn its own numbers; every rank saves (Lightning's rule)
        checkpoint["rng_states_per_rank"] = every_rank(rng_states())

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("state_dict")
        if saved is None:  # ModelParallelStrategy (FSDP2) has loaded the weights itself, non-strictly, and dropped them
            saved = torch.load(self.trainer.ckpt_path, map_location="cpu", mmap=True, weights_only=True)["state_dict"]
        check_lora_state({name: p.shape for name, p in self.named_parameters() if p.requires_grad}, saved)
        if "rng_states_per_rank" in checkpoint:
            states = checkpoint["rng_states_per_rank"]
            if len(states) == self.trainer.world_size:  # a fit must keep the count (its recipe is checked) ...
                restore_rng_states(states[self.global_rank])
            # ... evaluation on another count draws nothing from these generators (x_T: a generator per item)
        elif "rng_states" in checkpoint:  # older checkpoints: rank 0's states, on every rank
            restore_rng_states(checkpoint["rng_states"])
