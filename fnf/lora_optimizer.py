"""The optimizer side of training LoRA weights only: building it from the config with one-line errors, freeing the
gradients right after each step, and the gradient norm over all shards."""

from __future__ import annotations

import math

import lightning as L
import torch
from torch.distributed.tensor import DTensor
from typing_extensions import override


class LoraOptimizer(L.LightningModule):
    """A LightningModule whose ``self.model`` (a Text2ImageModel) trains its LoRA parameters with
    ``self.optimizer_factory`` and the optional ``self.lr_scheduler_factory`` (stepped every optimizer step)."""

    @override
    def configure_optimizers(self):
        try:
            optimizer = self.optimizer_factory(self.model.lora_parameters())
        except ValueError as error:  # torch's "Invalid learning rate: -1.0" names no key
            raise ValueError(f"model.optimizer.init_args: {error}") from None
        if any(math.isinf(group.get("lr", 0)) for group in optimizer.param_groups):  # torch refuses nan and < 0 only
            raise ValueError("model.optimizer.init_args.lr must be a finite number >= 0, got inf")
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.lr_scheduler_factory(optimizer), "interval": "step"}}

    @override
    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)  # free the LoRA grads now: Lightning would keep them through the next forward

    @override
    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.model.lora_parameters() if p.grad is not None]
        if grads:  # one foreach kernel, no per-parameter device syncs
            norm = torch.nn.utils.get_total_norm(grads)
            self.log("train/grad_norm", norm.full_tensor() if isinstance(norm, DTensor) else norm)  # FSDP2: all shards
