"""Per-row LoRA scale: one UNet call serves the base model θ0 on some batch rows and the tuned model θ on others.

The fused base pass (``SamplerArgs.fused_base``) runs I0's and I's gradient-free steps as one batch. Every LoRA
layer computes ``base(x) + B(A(x)) · s``; a forward hook on each ``A`` multiplies its output by a per-row 0/1 scale,
so base rows get exactly ``base(x)`` and tuned rows the full LoRA output. peft's own mixed-adapter batches
(``adapter_names=``) would do the same by indexing with Python lists in every layer, which syncs with the device.

The hooks are installed at the first fused pass and kept (no-ops while no scale is set), so a compiled UNet
sees one hook set rather than a new one per pass.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn


class LoraRowScale:
    """The hooks of one UNet's LoRA layers and the scale they apply (None: pass through)."""

    def __init__(self) -> None:
        self.scale_by_dims: dict[int, Tensor] | None = None  # (N,) reshaped to broadcast over 2-, 3- and 4-D outputs

    def install(self, unet: nn.Module) -> nn.Module:
        """Hook every LoRA ``A`` projection that has no hook yet (a new adapter brings new ones); returns one."""
        downs = [down for layer in unet.modules() if isinstance(layer, LoraLayer) for down in layer.lora_A.values()]
        for down in downs:
            if self._scale_rows not in down._forward_hooks.values():
                down.register_forward_hook(self._scale_rows)
        return downs[0]

    @contextmanager
    def applied(self, unet: nn.Module, rows: Tensor):
        """Within the block, LoRA deltas of batch row n are multiplied by ``rows[n]``."""
        down = self.install(unet)
        kind = rows.device.type
        autocast = torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)
        rows = rows.to(torch.get_autocast_dtype(kind) if autocast else down.weight.dtype)  # A's output dtype
        self.scale_by_dims = {dims: rows.view(-1, *[1] * (dims - 1)) for dims in (2, 3, 4)}
        try:
            yield
        finally:
            self.scale_by_dims = None

    def _scale_rows(self, module: nn.Module, args, output: Tensor) -> Tensor | None:
        if self.scale_by_dims is None:
            return None
        return output * self.scale_by_dims[output.dim()]  # (N, ...) * (N, 1, ...)
