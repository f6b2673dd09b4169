"""Preemption: SIGTERM (a cluster taking the node back) or SIGUSR1 (SLURM's warning before the time limit, sent with
``#SBATCH --signal=USR1@120``) -> finish the step, write last.ckpt, exit 128 + the signal's number (143 / 138).

Lightning's own SIGTERM handler sets ``trainer.received_sigterm`` and stops after the current batch by raising
``SIGTERMException``, a ``SystemExit`` with code 0, without saving anything; under DDP it broadcasts rank 0's flag
at every batch. SIGUSR1 here sets the same flag, so both stop alike. This callback writes ``last.ckpt`` first (when
that batch completed an optimizer step; mid-accumulation the previous checkpoint stands), and ``fnf.cli.main``
exits with ``exit_code``, so job scripts see a preempted run, which ``--ckpt_path last`` (or ``auto``) resumes
exactly. Registering SIGUSR1 before Lightning does keeps Lightning's SLURM handler (a mid-step HPC checkpoint in
another folder, then ``scontrol requeue``) out of the way; the job script requeues instead (README, "Clusters").
"""

from __future__ import annotations

import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


def exit_code(signum: int) -> int:
    return 128 + signum


class PreemptionCheckpoint(L.Callback):
    signal: int = signal.SIGTERM  # the signal that stopped the run (SIGTERM unless SIGUSR1 came)

    @staticmethod
    def last_path(trainer: L.Trainer) -> Path | None:
        callback = trainer.checkpoint_callback
        if callback is None or callback.dirpath is None:
            return None
        return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        def stop_after_this_step(signum, frame) -> None:
            self.signal = signum
            trainer._signal_connector.received_sigterm = True  # Lightning's stop (and its DDP broadcast) follows

        self._previous = signal.signal(signal.SIGUSR1, stop_after_this_step)

    def teardown(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if getattr(self, "_previous", None) is not None:
            signal.signal(signal.SIGUSR1, self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        path = self.last_path(trainer)
        if trainer.received_sigterm and stepped and path is not None:
            trainer.save_checkpoint(path)  # every rank calls it; rank 0 writes (atomically)
            rank_zero_info(f"fnf: {signal.Signals(self.signal).name}: saved {path} at step {trainer.global_step}; "
                           "resume with --ckpt_path last")
