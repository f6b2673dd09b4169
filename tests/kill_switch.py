"""A callback that SIGKILLs its own process, for the exact-resume test (imported by ``fnf fit`` by class_path)."""

import os
import signal

from lightning import Callback


class KillAtStep(Callback):
    """Kill -9 when the batch after optimizer step ``step`` starts (that step's checkpoint is already on disk)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
