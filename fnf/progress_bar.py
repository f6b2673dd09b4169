"""The training progress bar of fnf's commands: Lightning's rich bar, without its negative epoch total and v_num.

fnf runs stop at ``trainer.max_steps``, so Lightning sets ``max_epochs = -1`` (no epoch limit), which its rich bar
(Lightning 2.6) prints as "Epoch 12/-2"; fixed upstream after 2.6 (Lightning PR #21924), and mended here until then.
A run resumed mid-epoch counts on from the epoch's batch it restored, and its bar ends at the batch where it stops.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE


class RichBarWithoutEpochLimit(RichProgressBar):
    """"Epoch 12" where the number of epochs has no limit; "Epoch 12/99" where it has one, as Lightning's; a
    resumed epoch's total is the batch it stops at."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is not None and self.trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"  # padded as Lightning's

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        """A run restored mid-epoch gets its bar here, at batch ``batch_idx`` > 0 of the epoch, where Lightning's
        bar counts from, with a total of only the steps left ("Epoch 1 6/2"): the total becomes the epoch's batch
        where this run stops."""
        made_here = self.train_progress_bar_id is None
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar = self.train_progress_bar_id
        if made_here and bar is not None and self.progress is not None and trainer.max_epochs == -1 \
                and trainer.max_steps > 0:
            accumulate = trainer.accumulate_grad_batches  # batches per optimizer step
            batches_left = (trainer.max_steps - trainer.global_step) * accumulate - (batch_idx + 1) % accumulate
            self.progress.update(bar, total=min(trainer.num_training_batches, batch_idx + 1 + batches_left))
            self.refresh()  # not only at the next batch's end: Lightning drew its own total already

    def get_metrics(self, trainer, pl_module) -> dict:
        """The logged metrics without Lightning's ``v_num``: the rich bar shows a version folder's number as
        "0.000", a continued run's as "on_0"; fit names its run folder when it ends."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


def default_progress_bar(enabled: bool | None, callbacks: list) -> ProgressBar | None:
    """The bar to add to a trainer's callbacks: the rich one above where Lightning would pick its rich bar (rich is
    installed, the bar is enabled, no callback is a bar already); None leaves Lightning's choice."""
    if enabled is False or not _RICH_AVAILABLE or any(isinstance(c, ProgressBar) for c in callbacks):
        return None
    return RichBarWithoutEpochLimit()
