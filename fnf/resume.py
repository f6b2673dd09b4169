"""Exact resume: a run killed mid-epoch and restored from its last checkpoint trains on the same batches,
in the same order, with the same random numbers, as a run that never stopped.

Lightning restores weights, optimizer, schedulers and loop counters; this module adds what it leaves
to the user: a shuffle order that depends only on (seed, epoch), skipping the batches of the current
epoch that were already trained on, and the global RNG states (DRaFT-LV noise, LoRA dropout). Around it:
what a checkpoint holds (LoRA and RNG states only), ``--ckpt_path last`` (the newest last.ckpt, continuing
its run folder; a new run's folder: fnf.run_claims).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, DistributedSampler
from typing_extensions import override

from fnf.callbacks import LoraExporter, check_lora_folder
from fnf.checkpoint_io import AtomicCheckpointIO
from fnf.export import WEIGHT_NAME, save_lora
from fnf.files import remove_staging_files


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


def export_if_complete(trainer: L.Trainer, module: L.LightningModule, ckpt_path: str, run: Path | None) -> None:
    """For a checkpoint already at ``max_steps`` (nothing is left to train): rank 0 writes the run's LoRA export from
    the checkpoint if it is missing (a run killed between its last checkpoint and its export), where the run's
    ``lora_export.dirpath`` puts it (default: ``<run>/lora``, ``run`` the run's folder, on rank 0: not always the
    checkpoint's parent, e.g. with a ``checkpoint.dirpath`` of its own)."""
    checkpoint = AtomicCheckpointIO().load_checkpoint(ckpt_path)  # one-line errors for missing / corrupt files
    saved = checkpoint.get("state_dict") or {}
    check_lora_state({name: p.shape for name, p in module.named_parameters() if p.requires_grad}, saved)
    if trainer.global_rank != 0:
        return
    exporter = next((c for c in trainer.callbacks if isinstance(c, LoraExporter)), None)
    lora = run / "lora"
    if exporter is not None and exporter.dirpath:
        lora = Path(exporter.dirpath)
        check_lora_folder(lora, {})  # new, empty or an earlier LoRA export: never a foreign folder
    if not (lora / WEIGHT_NAME).is_file():
        module.load_state_dict(saved, strict=False)  # the LoRA; frozen weights are not in it
        save_lora(module.model, lora)
    rank_zero_info(f"fnf: {ckpt_path} is already at max_steps={trainer.max_steps}; nothing to train. LoRA: {lora}")


def remove_killed_writes(trainer: L.Trainer, ckpt_path: str, run: Path) -> None:
    """The staging files and folders of writes the run's last attempt was killed in, each as large as what it wrote:
    a checkpoint, metrics.csv and the run's other files, its LoRA export. For rank 0, holding the run's lock."""
    remove_staging_files(Path(ckpt_path).parent)
    remove_staging_files(run)
    exporter = next((c for c in trainer.callbacks if isinstance(c, LoraExporter)), None)
    export = Path(exporter.dirpath) if exporter is not None and exporter.dirpath else run / "lora"
    remove_staging_files(export.parent, export.name)  # a folder of its own, or one shared with other runs' exports


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
