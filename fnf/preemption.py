"""Preemption: SIGTERM (a cluster taking the node back) -> finish the step, write last.ckpt, exit 143.

Lightning's own SIGTERM handler sets ``trainer.received_sigterm`` and stops after the current batch by raising
``SIGTERMException``, a ``SystemExit`` with code 0, without saving anything. This callback writes ``last.ckpt``
first (when that batch completed an optimizer step; mid-accumulation the previous checkpoint stands), and
``fnf.cli.main`` turns the exit into 128 + SIGTERM = 143, so schedulers and scripts see a preempted run, which
``--ckpt_path last`` resumes exactly. On SLURM with Lightning's auto-requeue, its SIGUSR1 handler saves its own
checkpoint and requeues the job.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class PreemptionCheckpoint(L.Callback):
    @staticmethod
    def last_path(trainer: L.Trainer) -> Path | None:
        callback = trainer.checkpoint_callback
        if callback is None or callback.dirpath is None:
            return None
        return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        path = self.last_path(trainer)
        if trainer.received_sigterm and stepped and path is not None:
            trainer.save_checkpoint(path)  # every rank calls it; rank 0 writes (atomically)
            rank_zero_info(f"fnf: SIGTERM: saved {path} at step {trainer.global_step}; resume with --ckpt_path last")
