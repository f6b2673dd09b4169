"""A callback that SIGKILLs its own process, for the exact-resume test (imported by ``fnf fit`` by class_path)."""

import os
import signal

from lightning import Callback


class KillAtStep(Callback):
    """Send ``signal`` (default kill -9) to this process when the batch after optimizer step ``step`` starts
    (only in the process of global rank ``rank``, if given)."""

    def __init__(self, step: int, signal: str = "SIGKILL", rank: int | None = None) -> None:
        self.step, self.signal, self.rank = step, signal, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), getattr(signal, self.signal))
