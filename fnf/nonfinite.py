"""``model.nonfinite``: a step whose loss, rewards or fidelity term is not finite stops the run (raise) or is
skipped (skip), by every process together.

Lightning cannot skip a training step under DDP or FSDP by returning None (every process must run backward, or the
gradient all-reduce waits forever), so a skipped training step returns a zero loss that keeps the step's graph, every
process of the run skips the same step (one all-reduce of the finite flag), and the gradients are dropped before the
optimizer step: parameters, optimizer state (Adam's moments, its step count) and weight decay stay as they were.
"""

from __future__ import annotations

import warnings

import lightning as L
import torch
from torch import Tensor
from typing_extensions import override

MAX_SKIPPED_IN_A_ROW = 10
"""``model.nonfinite: skip`` stops the run after this many non-finite batches in a row (it would otherwise skip
forever, and export an untrained LoRA)."""


class NonFiniteSteps(L.LightningModule):
    """A LightningModule with ``self.nonfinite`` (raise | skip), ``self.head_names`` and ``self.regularizer``."""

    _skipped_in_a_row = 0
    _drop_update = False  # a skipped training step since the last optimizer step (with accumulation: in its window)

    def usable(self, stage: str, loss: Tensor, scores: Tensor, base_scores: Tensor | None,
               fidelity: Tensor | None) -> bool:
        """The step's one sync over its values (the base heatmaps' range is checked where I0 is sampled; a head may
        read its own values): every value finite and the fidelity term >= 0 on every image, on every process when
        skipping a training step. On failure, name the culprit: a reward on I0 or a negative fidelity term
        (always fatal: a broken head or regularizer), a reward on I, the fidelity term or the loss
        (``model.nonfinite`` decides)."""
        base_scores = scores.new_zeros(0, scores.shape[1]) if base_scores is None else base_scores  # (B or 0, heads)
        fidelity = scores.new_zeros(0) if fidelity is None else fidelity.detach().flatten()
        values = torch.cat([loss.reshape(1), scores.flatten(), base_scores.flatten(), fidelity])
        finite = torch.isfinite(values).all() & (fidelity >= 0).all()
        everywhere = finite
        if stage == "train" and self.nonfinite == "skip" and self._trainer is not None and self.trainer.world_size > 1:
            everywhere = self.trainer.strategy.reduce(finite.float(), reduce_op="min") > 0  # skipped by all or none
        if everywhere.item():
            self._skipped_in_a_row = 0
            return True
        if finite.item():
            return self._skip("values on another process of the run")
        names = self.head_names
        bad_base = [n for n, ok in zip(names, torch.isfinite(base_scores).all(0)) if not ok]
        bad_tuned = [n for n, ok in zip(names, torch.isfinite(scores).all(0)) if not ok]
        regularizer = type(self.regularizer).__name__
        if bad_base:
            raise FloatingPointError(f"non-finite reward {bad_base[0]} on the base image at step {self.global_step}")
        if (fidelity < 0).any():
            raise ValueError(f"regularizer {regularizer}: penalty must be >= 0 on every image, got "
                             f"{float(fidelity.min()):.4g} at step {self.global_step}")
        what = (f"reward {bad_tuned[0]}" if bad_tuned else "loss" if torch.isfinite(fidelity).all()
                else f"fidelity term ({regularizer})")
        if self.nonfinite == "raise":
            raise FloatingPointError(f"non-finite {what} at step {self.global_step}; "
                                     "set model.nonfinite=skip to skip such batches")
        return self._skip(what)

    def _skip(self, what: str) -> bool:
        self._skipped_in_a_row += 1
        if self._skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise FloatingPointError(f"non-finite {what} in {self._skipped_in_a_row} batches in a row at step "
                                     f"{self.global_step}: the run has diverged or a reward head is broken")
        warnings.warn(f"skipping batch at step {self.global_step}: non-finite {what}", stacklevel=3)
        return False

    def skipped(self, loss: Tensor, stage: str) -> dict | None:
        """What a skipped step returns: no outputs in validation and test; in training a zero loss with the step's
        graph (every process runs backward) whose gradients ``on_before_optimizer_step`` drops."""
        if stage != "train":
            return None
        self._drop_update = True
        return {"loss": loss.nan_to_num(0.0, 0.0, 0.0) * 0}

    @override
    def on_before_optimizer_step(self, optimizer) -> None:
        if self._drop_update:  # parameters without gradients: the optimizer leaves them and their state alone
            optimizer.zero_grad(set_to_none=True)
            self._drop_update = False
        super().on_before_optimizer_step(optimizer)
