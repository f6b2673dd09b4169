"""Exact resume: a run killed mid-epoch and restored from its last checkpoint trains on the same batches,
in the same order, with the same random numbers, as a run that never stopped.

Lightning restores weights, optimizer, schedulers and loop counters; this module adds what it leaves
to the user: a shuffle order that depends only on (seed, epoch), skipping the batches of the current
epoch that were already trained on, and the global RNG states (DRaFT-LV noise, LoRA dropout).
"""

from __future__ import annotations

import itertools

import torch
from torch.utils.data import DataLoader, DistributedSampler


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
    """Global RNG states as tensors (loadable with ``torch.load(weights_only=True)``)."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(states["cuda"]))
