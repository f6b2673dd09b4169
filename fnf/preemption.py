"""Preemption: SIGTERM (a cluster taking the node back), SIGUSR1 (SLURM's warning before the time limit, sent with
``#SBATCH --signal=USR1@120``) or a first Ctrl-C (SIGINT) -> finish the step, write last.ckpt, exit 128 + the
signal's number (143 / 138 / 130). A second Ctrl-C interrupts at once, as Ctrl-C always does (exit code 130 too).

Lightning's SIGTERM handler sets ``trainer.received_sigterm``, after which it stops at the end of the current batch
by raising ``SIGTERMException`` (a ``SystemExit`` with code 0) without saving anything. Under DDP that handler also
broadcasts from inside the signal handler, and Lightning's per-batch check reads rank 0's flag only, so a signal
that reaches some ranks only (a cluster reclaiming one node) ends in a collective mismatch or a hang. Here both
signals only note the signal; after every training batch the ranks agree (an all-reduce of one number: the
signal, 0 for none) and then all set Lightning's flag together, so every rank stops after the same step. This
callback writes ``last.ckpt`` first (when that batch completed an optimizer step; mid-accumulation the previous
checkpoint stands), and ``fnf.cli.main`` exits with ``exit_code``, so job scripts see a preempted run, which
``--ckpt_path last`` (or ``auto``) resumes exactly. Registering SIGUSR1 before Lightning does keeps Lightning's
SLURM handler (a mid-step HPC checkpoint in another folder, then ``scontrol requeue``) out of the way; the job
script requeues instead (docs/scale-and-reliability.md, "Preemption"). A signal during validation inside fit is
acted on after the current validation batch, not after the whole validation and the next training step. SIGTERM's
handler is replaced once training starts (Lightning installs its own after ``on_fit_start``) and restored by
Lightning when the run ends.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info


class PreemptionCheckpoint(L.Callback):
    signal: int = signal.SIGTERM  # the signal that stopped the run (SIGTERM unless SIGUSR1 or SIGINT came)
    _pending: int = 0  # a signal this process received that the ranks have not yet agreed on
    _stepped: bool = False  # the last training batch completed an optimizer step (a checkpoint now is exact)
    _announce: bool = True  # this rank says when a signal arrives
    interrupted: bool = False  # a Ctrl-C stopped the run at once (Lightning's KeyboardInterrupt path)

    @staticmethod
    def last_path(trainer: L.Trainer) -> Path | None:
        callback = trainer.checkpoint_callback
        if callback is None or callback.dirpath is None:
            return None
        return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"

    def _note(self, signum, frame) -> None:
        self._pending = signum  # no collective, no flag yet: on_train_batch_end decides with the other ranks
        again = ""
        if signum == signal.SIGINT:  # the next Ctrl-C does what it did before (KeyboardInterrupt)
            signal.signal(signal.SIGINT, self._previous[signal.SIGINT])
            again = "; Ctrl-C again stops at once"
        if self._announce:  # at once, so a Ctrl-C is seen to work; os.write: print may not re-enter from a handler
            os.write(2, f"\nfnf: {signal.Signals(signum).name}: stopping after the current training step, with "
                        f"last.ckpt{again}\n".encode())

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        """A second Ctrl-C: Lightning ends the run with exit code 1; ``fnf.cli.main`` makes it 130, as for the first."""
        if isinstance(exception, KeyboardInterrupt):
            self.signal, self.interrupted = signal.SIGINT, True

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        self._previous = {signal.SIGUSR1: signal.signal(signal.SIGUSR1, self._note)}

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self._announce = trainer.is_global_zero  # every rank of a node gets a terminal's Ctrl-C: one says so
        signal.signal(signal.SIGTERM, self._note)
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a background job ignores Ctrl-C: leave it so
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._note)

    def teardown(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        for signum, handler in getattr(self, "_previous", {}).items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        self._stop_if_signalled(trainer, pl_module)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        """Validation inside fit can outlast a preemption's grace period: stop after this validation batch, with
        the state of the last training step (validation changes nothing in it; Lightning resumes after the
        validation, which the resumed run skips)."""
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._stop_if_signalled(trainer, pl_module)

    def _stop_if_signalled(self, trainer: L.Trainer, pl_module) -> None:
        signum = self._pending
        if trainer.world_size > 1:  # every rank stops if any rank got a signal
            signum = int(trainer.strategy.reduce(torch.tensor([signum], device=pl_module.device),
                                                 reduce_op="max").item())  # one host sync per batch
        if not signum:
            return
        self.signal, self._pending = signum, 0
        trainer._signal_connector.received_sigterm = True  # Lightning stops after this batch, on every rank
        path = self.last_path(trainer)
        if self._stepped and path is not None:
            trainer.save_checkpoint(path, weights_only=False)  # every rank calls it; rank 0 writes (atomically)
            rank_zero_info(f"fnf: {signal.Signals(self.signal).name}: saved {path} at step {trainer.global_step}; "
                           "resume with --ckpt_path last")
