"""Probes of the 2-process DDP test (imported by ``fnf fit`` by class_path): a DDP communication hook that counts the
bytes it all-reduces, and ranks whose global RNG streams differ."""

from pathlib import Path

import torch
from lightning import Callback
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

REDUCED = [0]


def counting_allreduce(state, bucket):
    REDUCED[0] += bucket.buffer().numel() * bucket.buffer().element_size()
    return default_hooks.allreduce_hook(state, bucket)


class WriteReducedBytes(Callback):
    """Counts the gradient bytes DDP all-reduces (Lightning registers comm hooks on CUDA only, so this
    callback registers it) and, at the end of fit, writes the count per rank."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_start(self, trainer, pl_module) -> None:
        trainer.strategy.model.register_comm_hook(None, counting_allreduce)

    def on_train_end(self, trainer, pl_module) -> None:
        Path(self.folder, f"reduced-rank{trainer.global_rank}.txt").write_text(str(REDUCED[0]))




class DivergeRanksRng(Callback):
    """Rank r draws r + 1 numbers from the global CPU generator after the model is built: the ranks' RNG states
    differ, as their CUDA generators do on GPUs (each rank draws DRaFT-LV noise on its own device)."""

    def on_train_start(self, trainer, pl_module) -> None:
        torch.rand(trainer.global_rank + 1)
