"""A callback that SIGKILLs its own process, for the exact-resume test (imported by ``fnf fit`` by class_path)."""

import os
import signal
import sys

from lightning import Callback


class KillAtStep(Callback):
    """Send ``signal`` (default kill -9) ``times`` times to this process when the batch after optimizer step
    ``step`` starts (only in the process of global rank ``rank``, if given). ``validation``: instead, when batch 1
    of the first validation inside fit at or after that step starts; it prints the step, and every validation
    batch it sees start after that, to stderr."""

    def __init__(self, step: int, signal: str = "SIGKILL", rank: int | None = None, validation: bool = False,
                 times: int = 1) -> None:
        self.step, self.signal, self.rank, self.validation, self.times = step, signal, rank, validation, times
        self.fired = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.validation and trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            for _ in range(self.times):  # two Ctrl-C: the first is noted, the second interrupts
                os.kill(os.getpid(), getattr(signal, self.signal))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not self.validation or trainer.sanity_checking:
            return
        if self.fired:
            print(f"kill_switch: validation batch {batch_idx} started after the signal", file=sys.stderr, flush=True)
        elif trainer.global_step >= self.step and batch_idx == 1:
            self.fired = True
            print(f"kill_switch: {self.signal} in validation after step {trainer.global_step}", file=sys.stderr,
                  flush=True)
            os.kill(os.getpid(), getattr(signal, self.signal))


class RaiseAtStep(Callback):
    """Raise RuntimeError when the batch after optimizer step ``step`` starts (a run failing mid-training)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"kill_switch: failing at step {self.step}")


class ExpectRunFolderLocked(Callback):
    """Fails the run unless its folder is locked against a second fit while it trains (fnf.run_claims.lock_run_folder)."""

    def on_train_start(self, trainer, pl_module) -> None:
        from pathlib import Path

        from fnf.run_claims import lock_run_folder

        try:
            lock_run_folder(Path(trainer.log_dir)).close()
        except ValueError:
            return
        raise AssertionError(f"{trainer.log_dir} is not locked while fit trains in it")


class WriteFileAtStart(Callback):
    """Writes ``path`` when training starts: another program filling a folder while fnf trains."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module) -> None:
        from pathlib import Path

        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        Path(self.path).write_text("precious\n")
