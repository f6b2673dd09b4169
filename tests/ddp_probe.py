"""A DDP communication hook that counts the bytes it all-reduces (imported by ``fnf fit`` by class_path)."""

from pathlib import Path

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


